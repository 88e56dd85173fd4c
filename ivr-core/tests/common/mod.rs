//! What ivr-core's test binaries share: a bound on every await, and reading the manager's
//! Prometheus counters.

#![allow(dead_code)] // each test binary uses a part of this

use std::future::Future;
use std::time::Duration;

use prometheus::Registry;

/// Awaits `fut`, failing the test if it takes longer than `limit`.
pub async fn within<T>(what: &str, limit: Duration, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(limit, fut).await.unwrap_or_else(|_| panic!("{what}: no result within {limit:?}"))
}

/// The sum of a counter family's values, all labels together.
pub fn counter(registry: &Registry, name: &str) -> f64 {
    registry
        .gather()
        .iter()
        .filter(|family| family.name() == name)
        .flat_map(|family| family.get_metric().iter().map(|m| m.get_counter().get_value()))
        .sum()
}

/// The value of one labelled counter (`label="value"`) of a family.
pub fn counter_with(registry: &Registry, name: &str, label: &str, value: &str) -> f64 {
    registry
        .gather()
        .iter()
        .filter(|family| family.name() == name)
        .flat_map(|family| family.get_metric().iter())
        .filter(|m| m.get_label().iter().any(|l| l.name() == label && l.value() == value))
        .map(|m| m.get_counter().get_value())
        .sum()
}
