//! What a worker's `/metrics` reads at scrape time: consuming or paused, each platform's
//! providers usable, a suspected mistake, and the providers' own numbers per app.

use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;

use super::Counters;
use crate::metrics::encode;
use crate::provider::Providers;

/// A child of a provider's family at scrape time: its labels and value.
type Child = (Vec<(String, String)>, i64);

/// What is only known at scrape time: whether the worker consumes or is paused, and its
/// providers' connections.
#[derive(Debug)]
pub(super) struct Scrape {
    pub(super) counters: Arc<Counters>,
    pub(super) providers: Providers,
}

impl Collector for Scrape {
    fn encode(&self, mut e: DescriptorEncoder) -> fmt::Result {
        let c = &self.counters;
        encode::gauge(
            &mut e,
            "broker_connected",
            "1 while consuming from the broker.",
            c.broker_connected.load(Ordering::Relaxed) as i64,
        )?;
        encode::gauge(
            &mut e,
            "paused",
            "1 while consumption is paused (until a probe of what failed succeeds).",
            (c.paused_provider.load(Ordering::Relaxed) || c.paused_database.load(Ordering::Relaxed))
                as i64,
        )?;
        let p = &self.providers;
        let paused_for = c.paused_for();
        let entries = p.entries();
        // Per platform: usable while every app's provider of it is.
        let up: Vec<_> = p
            .platforms()
            .into_iter()
            .map(|platform| {
                let usable = paused_for != Some(platform)
                    && entries
                        .iter()
                        .filter(|(_, q)| q.platform() == platform)
                        .all(|(_, q)| q.up());
                (platform.as_str(), i64::from(usable))
            })
            .collect();
        encode::gauges(
            &mut e,
            "provider_up",
            "1 while a configured push service is usable as far as this worker knows, for every app that has it (APNs: consumption not paused for it and no endpoint in reconnect backoff; FCM: a connection can be had and the last access-token exchange worked).",
            "platform",
            &up,
        )?;
        let suspected: Vec<_> = p
            .platforms()
            .into_iter()
            .map(|platform| (platform.as_str(), i64::from(p.guard.suspected(platform))))
            .collect();
        encode::gauges(
            &mut e,
            "config_suspected",
            "1 while a configured push service answers \"dead\" to most tokens of a scope (an app's APNs environment and topic, an FCM project), or to tokens it took lately: a configuration mistake is suspected, the tokens are kept and their rings retried (docs/design.md, 'A configuration mistake never deletes the fleet's tokens').",
            "platform",
            &suspected,
        )?;
        // The providers' own numbers, one family per name, a child per app.
        let mut families: Vec<(crate::provider::Stat, Vec<Child>)> = Vec::new();
        for (app, provider) in &entries {
            for stat in provider.stats() {
                let mut labels = vec![("app".to_owned(), app.as_str().to_owned())];
                labels.extend(
                    stat.labels
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string())),
                );
                let value = stat.value;
                match families.iter_mut().find(|(s, _)| s.name == stat.name) {
                    Some((_, children)) => children.push((labels, value)),
                    None => families.push((stat, vec![(labels, value)])),
                }
            }
        }
        for (stat, children) in &families {
            encode::family(&mut e, stat.name, stat.help, stat.counter, children)?;
        }
        Ok(())
    }
}
