//! Configuration the mesh could not take as written, as data: the admin
//! API (`/config_dump`, section `config_problems`), `isthmus status` and
//! `isthmus_config_rejected_total{kind,reason}` show it, so a user sees a
//! refused object without reading logs.

use super::istio::PolicyError;

/// What Isthmus does with an object it cannot take as written.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Effect {
    /// Not applied; the rest of the configuration is.
    Ignored,
    /// An AuthorizationPolicy: kept as one that denies every request to
    /// the workloads it selects (fail closed).
    DeniesEveryRequest,
    /// A PeerAuthentication: kept as STRICT for what it selects.
    Strict,
}

impl Effect {
    /// The metric label value (`reason`).
    pub fn as_str(self) -> &'static str {
        match self {
            Effect::Ignored => "ignored",
            Effect::DeniesEveryRequest => "denies_every_request",
            Effect::Strict => "strict",
        }
    }
}

/// One object that was refused or applied in its strictest form.
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct ConfigProblem {
    pub kind: String,
    pub namespace: String,
    pub name: String,
    /// What is wrong, naming the field and the fix.
    pub message: String,
    pub effect: Effect,
}

impl ConfigProblem {
    pub fn from_error(e: &PolicyError, effect: Effect) -> Self {
        let PolicyError::Spec {
            kind,
            namespace,
            name,
            detail,
        } = e;
        Self {
            kind: (*kind).to_owned(),
            namespace: namespace.clone(),
            name: name.clone(),
            message: detail.clone(),
            effect,
        }
    }
}

impl ConfigProblem {
    /// `Kind namespace/name`.
    pub fn object(&self) -> String {
        format!("{} {}/{}", self.kind, self.namespace, self.name)
    }

    /// What is wrong and what Isthmus does instead.
    pub fn describe(&self) -> String {
        let effect = match self.effect {
            Effect::Ignored => "not applied",
            Effect::DeniesEveryRequest => {
                "denies every request to the workloads it selects until fixed"
            }
            Effect::Strict => "applied as STRICT until fixed",
        };
        format!("{} ({effect})", self.message)
    }
}

impl std::fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.object(), self.describe())
    }
}
