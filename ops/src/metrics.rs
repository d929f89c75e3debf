//! The one way every service declares a metric: defined and registered in
//! one call ([`register`]).

use prometheus::core::Collector;
use prometheus::Registry;

/// Registers a metric just defined and returns it. Definitions are static,
/// so a refusal (a bad name, a name registered twice) is a bug: it panics
/// with the reason.
pub fn register<M: Collector + Clone + 'static>(registry: &Registry, metric: prometheus::Result<M>) -> M {
    let metric = metric.unwrap_or_else(|e| panic!("metric definition: {e}"));
    registry
        .register(Box::new(metric.clone()))
        .unwrap_or_else(|e| panic!("metric registration: {e}"));
    metric
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_registered_metric_is_exported_and_a_second_registration_is_a_bug() {
        let registry = Registry::new();
        let c = register(&registry, prometheus::IntCounter::new("x_total", "X."));
        c.inc();
        assert!(crate::render(&registry).contains("x_total 1"));
        let twice = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            register(&registry, prometheus::IntCounter::new("x_total", "X."))
        }));
        assert!(twice.is_err());
    }
}
