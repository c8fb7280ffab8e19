//! `isthmus link`: peer two clusters with a one-time token.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Subcommand;
use isthmus_core::config::parse_duration;
use isthmus_core::identity::trust::fingerprint;
use isthmus_core::identity::{ClusterCa, SpiffeId};
use isthmus_federation::config::{ControllerConfig, KubeSource};
use isthmus_federation::link::{PeerFile, Token, TokenStore};

fn duration(s: &str) -> Result<Duration, String> {
    parse_duration(s).ok_or_else(|| format!("{s:?} is not a duration; use e.g. 30m or 1h"))
}

/// Which cluster: a controller config file (files mode), or a Kubernetes
/// cluster through a kubeconfig context (kube mode).
#[derive(Debug, Clone, clap::Args)]
pub struct Target {
    /// This cluster's controller config (files mode).
    #[arg(long, conflicts_with_all = ["context", "kubeconfig"], required_unless_present_any = ["context", "kubeconfig"])]
    config: Option<PathBuf>,
    /// The kubeconfig context of the cluster (kube mode).
    #[arg(long)]
    context: Option<String>,
    /// The kubeconfig file (default: $KUBECONFIG or ~/.kube/config).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// The controller's namespace (kube mode).
    #[arg(long, short = 'n', default_value = "isthmus-system")]
    namespace: String,
}

#[derive(Debug, Subcommand)]
pub enum LinkCommand {
    /// Print a one-time token that lets another cluster peer with this one.
    Create {
        #[command(flatten)]
        target: Target,
        /// How long the token stays valid.
        #[arg(long, value_parser = duration, default_value = "1h")]
        ttl: Duration,
    },
    /// Make the cluster that printed TOKEN a peer of this one. The running
    /// controller links on its next scan of its state (directory or
    /// Secrets).
    Apply {
        #[command(flatten)]
        target: Target,
        /// The token printed by `isthmus link create` in the other cluster.
        token: String,
    },
}

/// Runs a kube-mode link step on a small runtime of its own.
fn on_cluster<T>(
    target: &Target,
    step: impl AsyncFnOnce(&KubeSource) -> Result<T, String>,
) -> anyhow::Result<T> {
    isthmus_core::tls::install_crypto_provider();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let source = KubeSource {
        kubeconfig: target.kubeconfig.clone(),
        context: target.context.clone(),
        ..Default::default()
    };
    rt.block_on(step(&source)).map_err(anyhow::Error::msg)
}

pub fn run(cmd: LinkCommand) -> anyhow::Result<()> {
    match cmd {
        LinkCommand::Create { target, ttl } if target.config.is_none() => {
            let ns = target.namespace.clone();
            let (token, info) = on_cluster(&target, async |s| {
                isthmus_federation::state_store::create_token(s, &ns, ttl).await
            })?;
            eprintln!(
                "token for cluster {} (valid {}s, single use); in the other cluster run:\n  isthmus link apply --context <its context> <token>",
                info.cluster,
                ttl.as_secs()
            );
            println!("{}", token.encoded);
        }
        LinkCommand::Apply { target, token } if target.config.is_none() => {
            let token = Token::decode(&token)?;
            let ns = target.namespace.clone();
            let own = on_cluster(&target, async |s| {
                isthmus_federation::state_store::apply_token(s, &ns, &token).await
            })?;
            println!(
                "peer {} ({}) recorded as a Secret in {}; the controller of {own} links on its next scan (see `isthmus status`)",
                token.payload.cluster, token.payload.address, target.namespace
            );
        }
        LinkCommand::Create { target, ttl } => {
            let config = target.config.expect("checked above");
            let config: ControllerConfig = isthmus_core::config::load(&config)?;
            let ca = ClusterCa::load(&config.ca_dir)?;
            let Some(address) = config.advertised() else {
                bail!(
                    "the controller listens on {} which peers cannot dial; set advertiseAddress to the address they should use",
                    config.federation_addr
                );
            };
            let id = SpiffeId::controller(&config.cluster.trust_domain, &config.cluster.name.0)?;
            let token = Token::create(
                &config.cluster.name.0,
                config.cluster.trust_domain.as_str(),
                &address,
                &id.to_string(),
                &fingerprint(ca.root()),
                ttl,
            );
            TokenStore::new(&config.state_dir)
                .add(&token)
                .with_context(|| {
                    format!("cannot record the token in {}", config.state_dir.display())
                })?;
            eprintln!(
                "token for cluster {} (valid {}, single use); in the other cluster run:\n  isthmus link apply --config <its controller config> <token>",
                config.cluster.name,
                format_args!("{}s", ttl.as_secs())
            );
            println!("{}", token.encoded);
        }
        LinkCommand::Apply { target, token } => {
            let config = target.config.expect("checked above");
            let config: ControllerConfig = isthmus_core::config::load(&config)?;
            let token = Token::decode(&token)?;
            if token.payload.cluster == config.cluster.name.0 {
                bail!(
                    "this token was created by cluster {} itself; apply it in the other cluster",
                    token.payload.cluster
                );
            }
            let file = PeerFile::pending(&token);
            file.write(&config.state_dir).with_context(|| {
                format!("cannot record the peer in {}", config.state_dir.display())
            })?;
            println!(
                "peer {} ({}) recorded; the controller of {} links on its next scan (see `isthmus status`)",
                token.payload.cluster, token.payload.address, config.cluster.name
            );
        }
    }
    Ok(())
}
