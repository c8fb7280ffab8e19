//! Which cluster serves a tunnel: candidates in order of preference.
//!
//! Candidates are the clusters exporting the service with healthy
//! endpoints (of the subset) whose gateway is up. Order:
//! 1. tiers by locality relative to this gateway: same region and zone,
//!    same region, the region a DestinationRule's `failover` names for
//!    ours, then the rest; with `failoverPriority`, by how many of the
//!    listed labels match ours, locality breaking ties;
//! 2. inside a tier, weighted random by healthy endpoints
//!    (T_i = W_i / Σ W_j · T_total), so each is first in its share of
//!    connections and the rest follow as failover;
//! 3. with `distribute`, the first tier is every cluster the rule sends
//!    traffic to, weighted by its percentage.
//!
//! Clusters whose gateway is down or ejected come last (better a doubtful
//! cluster than none).

use std::collections::BTreeMap;

use isthmus_core::model::{DestinationRule, ImportedService, Locality, RemoteCluster};
use rand::Rng;

use crate::pool::Health;

/// Labels a cluster offers for `failoverPriority`.
fn cluster_label<'a>(c: &'a RemoteCluster, key: &str) -> Option<&'a str> {
    match key {
        "topology.kubernetes.io/region" => Some(&c.locality.region),
        "topology.kubernetes.io/zone" => Some(&c.locality.zone),
        "topology.istio.io/subzone" => Some(&c.locality.subzone),
        "topology.istio.io/cluster" => Some(&c.cluster),
        _ => None,
    }
}

fn own_label<'a>(cluster: &'a str, me: &'a Locality, key: &str) -> Option<&'a str> {
    match key {
        "topology.kubernetes.io/region" => Some(&me.region),
        "topology.kubernetes.io/zone" => Some(&me.zone),
        "topology.istio.io/subzone" => Some(&me.subzone),
        "topology.istio.io/cluster" => Some(cluster),
        _ => None,
    }
}

/// Locality tier: lower is nearer.
fn locality_tier(c: &RemoteCluster, me: &Locality, failover_to: Option<&str>) -> u32 {
    if !me.region.is_empty() && c.locality.region == me.region {
        if !me.zone.is_empty() && c.locality.zone == me.zone {
            0
        } else {
            1
        }
    } else if failover_to.is_some_and(|r| r == c.locality.region) {
        2
    } else {
        3
    }
}

/// One candidate with why it is where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub cluster: String,
    pub tier: u32,
    pub weight: u32,
    pub health: Health,
}

/// Orders the clusters that could serve `svc` (see the module docs).
pub fn candidates(
    local_cluster: &str,
    me: &Locality,
    svc: &ImportedService,
    subset: &BTreeMap<String, String>,
    dr: Option<&DestinationRule>,
    health: impl Fn(&str) -> Health,
    rng: &mut impl Rng,
) -> Vec<Candidate> {
    let lb = dr.and_then(|d| d.locality_lb.as_ref());
    let failover_to = lb.and_then(|l| {
        l.failover
            .iter()
            .find(|(from, _)| *from == me.region)
            .map(|(_, to)| to.as_str())
    });
    let distribute = lb.and_then(|l| l.distribute.iter().find(|(from, _)| me.matches(from)));

    let mut all: Vec<Candidate> = svc
        .clusters
        .iter()
        .filter(|c| c.cluster != local_cluster)
        .filter_map(|c| {
            let healthy = c.healthy(subset);
            if healthy == 0 {
                return None;
            }
            let (tier, weight) = if let Some((_, to)) = distribute {
                let pct: u32 = to
                    .iter()
                    .filter(|(p, _)| c.locality.matches(p))
                    .map(|(_, w)| *w)
                    .sum();
                if pct > 0 {
                    (0, pct)
                } else {
                    (10 + locality_tier(c, me, failover_to), healthy)
                }
            } else if let Some(keys) = lb.map(|l| &l.failover_priority).filter(|k| !k.is_empty()) {
                let matched = keys
                    .iter()
                    .take_while(|k| {
                        cluster_label(c, k).is_some()
                            && cluster_label(c, k) == own_label(local_cluster, me, k)
                    })
                    .count() as u32;
                (
                    (keys.len() as u32 - matched) * 10 + locality_tier(c, me, failover_to),
                    healthy,
                )
            } else {
                (locality_tier(c, me, failover_to), healthy)
            };
            Some(Candidate {
                cluster: c.cluster.clone(),
                tier,
                weight,
                health: health(&c.cluster),
            })
        })
        .collect();

    // Unhealthy gateways go after every healthy one, keeping their order.
    let penalty = |c: &Candidate| if c.health == Health::Up { 0 } else { 1000 };
    all.sort_by_key(|c| (penalty(c) + c.tier, c.cluster.clone()));

    // Weighted shuffle inside each tier: repeatedly draw with probability
    // proportional to weight.
    let mut out = Vec::with_capacity(all.len());
    let mut i = 0;
    while i < all.len() {
        let key = penalty(&all[i]) + all[i].tier;
        let mut j = i;
        while j < all.len() && penalty(&all[j]) + all[j].tier == key {
            j += 1;
        }
        let mut tier: Vec<Candidate> = all[i..j].to_vec();
        while !tier.is_empty() {
            let total: u64 = tier.iter().map(|c| u64::from(c.weight)).sum();
            let mut pick = rng.random_range(0..total.max(1));
            let idx = tier
                .iter()
                .position(|c| {
                    if pick < u64::from(c.weight) {
                        true
                    } else {
                        pick -= u64::from(c.weight);
                        false
                    }
                })
                .unwrap_or(0);
            out.push(tier.remove(idx));
        }
        i = j;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use isthmus_core::model::{EndpointGroup, ServiceKey};
    use rand::SeedableRng;

    fn cluster(name: &str, region: &str, zone: &str, healthy: u32) -> RemoteCluster {
        RemoteCluster {
            cluster: name.into(),
            locality: Locality::new(region, zone),
            groups: std::sync::Arc::from([EndpointGroup {
                locality: Locality::new(region, zone),
                labels: [("version".to_owned(), "v1".to_owned())].into(),
                healthy,
                total: healthy.max(1),
            }]),
            stale: false,
        }
    }

    fn svc(clusters: Vec<RemoteCluster>) -> ImportedService {
        ImportedService {
            key: ServiceKey::new("sample", "helloworld"),
            ports: vec![],
            clusters,
        }
    }

    fn order(s: &ImportedService, dr: Option<&DestinationRule>, down: &[&str]) -> Vec<String> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let me = Locality::new("us-east1", "us-east1-a");
        candidates(
            "east",
            &me,
            s,
            &BTreeMap::new(),
            dr,
            |c| {
                if down.contains(&c) {
                    Health::Down
                } else {
                    Health::Up
                }
            },
            &mut rng,
        )
        .into_iter()
        .map(|c| c.cluster)
        .collect()
    }

    #[test]
    fn nearer_regions_first_dead_and_empty_clusters_last_or_out() {
        let s = svc(vec![
            cluster("eu", "europe-west1", "b", 3),
            cluster("west", "us-west1", "a", 3),
            cluster("east2", "us-east1", "us-east1-b", 3),
            cluster("empty", "us-east1", "us-east1-a", 0),
        ]);
        assert_eq!(order(&s, None, &[]), ["east2", "eu", "west"]);
        assert_eq!(order(&s, None, &["east2"]), ["eu", "west", "east2"]);
    }

    #[test]
    fn failover_rule_names_the_next_region() {
        let s = svc(vec![
            cluster("eu", "europe-west1", "b", 3),
            cluster("west", "us-west1", "a", 3),
        ]);
        let dr = DestinationRule::from_spec(
            "sample",
            "hw",
            &serde_json::json!({"host": "helloworld", "trafficPolicy": {"loadBalancer": {"localityLbSetting": {"failover": [{"from": "us-east1", "to": "europe-west1"}]}}}}),
        )
        .unwrap();
        assert_eq!(order(&s, Some(&dr), &[]), ["eu", "west"]);
    }

    #[test]
    fn weights_follow_healthy_endpoints_within_a_tier() {
        let s = svc(vec![
            cluster("west", "us-west1", "a", 9),
            cluster("eu", "europe-west1", "b", 1),
        ]);
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let me = Locality::new("us-east1", "us-east1-a");
        let n = 10_000;
        let west_first = (0..n)
            .filter(|_| {
                candidates(
                    "east",
                    &me,
                    &s,
                    &BTreeMap::new(),
                    None,
                    |_| Health::Up,
                    &mut rng,
                )[0]
                .cluster
                    == "west"
            })
            .count();
        // Expected 90 %; 4 sigma of a binomial(10000, 0.9) is 1.2 %.
        let share = west_first as f64 / n as f64;
        assert!((0.88..=0.92).contains(&share), "west first in {share}");
    }

    #[test]
    fn subset_without_endpoints_in_a_cluster_excludes_it() {
        let s = svc(vec![cluster("west", "us-west1", "a", 3)]);
        let me = Locality::new("us-east1", "a");
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let v2 = [("version".to_owned(), "v2".to_owned())].into();
        assert!(candidates("east", &me, &s, &v2, None, |_| Health::Up, &mut rng).is_empty());
    }
}
