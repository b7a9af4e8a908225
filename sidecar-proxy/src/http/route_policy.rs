//! What a route does to a request before it goes upstream: its local rate limit (429, flag
//! `RL`, as Envoy's local rate limit) and the faults it injects (a delay, flag `DI`, or an
//! answer of its own, flag `FI`, as Istio's VirtualService `fault`). The limiters live in the
//! route table, so a reload of the routing config starts them afresh.
use governor::{DefaultDirectRateLimiter, Quota};
use http::StatusCode;

use super::{
    config::{Percentage, RateLimit, RouteConfig},
    metrics::ResponseFlag,
    random::random_below,
};

/// A route's (or an inbound port's) token bucket.
pub struct RateLimiter(DefaultDirectRateLimiter);

impl RateLimiter {
    pub fn new(limit: RateLimit) -> Self {
        let quota = Quota::per_second(limit.requests_per_second).allow_burst(limit.burst);
        RateLimiter(DefaultDirectRateLimiter::direct(quota))
    }

    /// Takes a token if there is one.
    pub fn admit(&self) -> bool {
        self.0.check().is_ok()
    }
}

/// The verdict on one request.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Go upstream; `delayed` when a delay was injected first.
    Proceed { delayed: bool },
    /// Answer locally.
    Reply {
        status: StatusCode,
        flag: ResponseFlag,
        reason: &'static str,
    },
}

/// Applies `route`'s rate limit, then its faults (a delay first, as Envoy's fault filter does).
pub async fn before_upstream(route: &RouteConfig, limiter: Option<&RateLimiter>) -> Verdict {
    if limiter.is_some_and(|limiter| !limiter.admit()) {
        return Verdict::Reply {
            status: StatusCode::TOO_MANY_REQUESTS,
            flag: ResponseFlag::RateLimited,
            reason: "local rate limit exceeded",
        };
    }
    let Some(fault) = &route.fault else {
        return Verdict::Proceed { delayed: false };
    };
    let mut delayed = false;
    if let Some(delay) = &fault.delay
        && chosen(delay.percentage)
    {
        tokio::time::sleep(delay.fixed_delay).await;
        delayed = true;
    }
    if let Some(abort) = &fault.abort
        && chosen(abort.percentage)
    {
        return Verdict::Reply {
            status: abort.http_status.0,
            flag: ResponseFlag::FaultInjected,
            reason: "fault injected",
        };
    }
    Verdict::Proceed { delayed }
}

/// True for `percentage` of the calls (to a millionth).
fn chosen(percentage: Percentage) -> bool {
    (random_below(1_000_000) as f64) < percentage.value * 10_000.0
}

#[cfg(test)]
mod tests {
    use std::{num::NonZeroU32, time::Duration};

    use super::*;
    use crate::http::config::{Fault, FaultAbort, FaultDelay, HttpStatus};

    fn route(fault: Option<Fault>) -> RouteConfig {
        serde_yaml::from_str::<RouteConfig>("{name: r, destinations: [{service: s}]}")
            .map(|mut route| {
                route.fault = fault;
                route
            })
            .unwrap()
    }

    #[tokio::test]
    async fn the_bucket_admits_its_burst_then_refuses() {
        let limit = RateLimit {
            requests_per_second: NonZeroU32::new(1).unwrap(),
            burst: NonZeroU32::new(3).unwrap(),
        };
        let limiter = RateLimiter::new(limit);
        let plain = route(None);
        for _ in 0..3 {
            assert_eq!(
                before_upstream(&plain, Some(&limiter)).await,
                Verdict::Proceed { delayed: false }
            );
        }
        assert!(matches!(
            before_upstream(&plain, Some(&limiter)).await,
            Verdict::Reply {
                status: StatusCode::TOO_MANY_REQUESTS,
                flag: ResponseFlag::RateLimited,
                ..
            }
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn faults_apply_to_their_share_of_requests() {
        let always = Percentage { value: 100.0 };
        let never = Percentage { value: 0.0 };
        let delay_then_abort = route(Some(Fault {
            delay: Some(FaultDelay {
                percentage: always,
                fixed_delay: Duration::from_secs(2),
            }),
            abort: Some(FaultAbort {
                percentage: always,
                http_status: HttpStatus(StatusCode::SERVICE_UNAVAILABLE),
            }),
        }));
        let started = tokio::time::Instant::now();
        assert_eq!(
            before_upstream(&delay_then_abort, None).await,
            Verdict::Reply {
                status: StatusCode::SERVICE_UNAVAILABLE,
                flag: ResponseFlag::FaultInjected,
                reason: "fault injected"
            }
        );
        assert_eq!(started.elapsed(), Duration::from_secs(2));
        let untouched = route(Some(Fault {
            delay: Some(FaultDelay {
                percentage: never,
                fixed_delay: Duration::from_secs(2),
            }),
            abort: Some(FaultAbort {
                percentage: never,
                http_status: HttpStatus(StatusCode::SERVICE_UNAVAILABLE),
            }),
        }));
        assert_eq!(
            before_upstream(&untouched, None).await,
            Verdict::Proceed { delayed: false }
        );
        let half = (0..4000)
            .filter(|_| chosen(Percentage { value: 50.0 }))
            .count();
        assert!((1700..2300).contains(&half), "{half} of 4000 at 50%");
    }
}
