//! The one decision after each try: send the request again, or let the try's outcome stand.
//! Retries follow the route's policy (`retryOn`, `attempts`, the per-try timeout, within the
//! route's timeout) for requests whose body was kept, within the service's retry budget. A
//! request that fails on a reused connection before any response byte is sent once more on a
//! new one even without a policy, and outside the budget (the server closed it while idle:
//! istio#13205), if it was never written or is idempotent.
use std::time::{Duration, Instant};

use http::{Method, Request};

use super::{
    attempt::{Attempt, Failure},
    balancer::ServiceState,
    body::ProxyBody,
    config::{RetryOn, RetryPolicy},
    metrics::{HttpMetrics, ResponseFlag},
    record::RequestRecord,
};

/// After a try.
pub enum Next {
    /// Try again: with the request the failed try gave back unsent, or a new one from the kept
    /// body.
    Again(Option<Request<ProxyBody>>),
    /// The try's outcome is the request's.
    Done(Attempt),
}

/// The tries of one request.
pub struct Retries<'a> {
    service: &'a ServiceState,
    metrics: &'a HttpMetrics,
    policy: Option<&'a RetryPolicy>,
    /// The body was kept (only when a retry may need it), so the request can be sent again.
    replayable: bool,
    idempotent: bool,
    max_tries: u32,
    /// The route's timeout, from the start of the request.
    route_timeout: Duration,
    deadline: Instant,
    tries: u32,
    stale_retry_done: bool,
    /// The try in flight is a retry of the budget.
    in_budget: bool,
}

impl<'a> Retries<'a> {
    pub fn new(
        service: &'a ServiceState,
        metrics: &'a HttpMetrics,
        policy: Option<&'a RetryPolicy>,
        idempotent: bool,
        replayable: bool,
        (started, route_timeout): (Instant, Duration),
    ) -> Self {
        Retries {
            service,
            metrics,
            policy,
            replayable,
            idempotent,
            max_tries: 1 + policy.map_or(0, |policy| policy.attempts),
            route_timeout,
            deadline: started + route_timeout,
            tries: 0,
            stale_retry_done: false,
            in_budget: false,
        }
    }

    /// Starts a try: its number, and when it times out (its per-try timeout, within the
    /// route's).
    pub fn start(&mut self) -> (u32, Instant) {
        self.tries += 1;
        let deadline = self
            .policy
            .and_then(|policy| policy.per_try_timeout)
            .map_or(self.deadline, |per_try| {
                self.deadline.min(Instant::now() + per_try)
            });
        (self.tries, deadline)
    }

    /// Whether to send the request again after `attempt`; when not, the request ends with it
    /// (flagged `URX` when retries were used up).
    pub fn after(&mut self, attempt: Attempt, record: &mut RequestRecord) -> Next {
        if std::mem::take(&mut self.in_budget) {
            self.service.finish_retry();
        }
        if let Attempt::Failed(Failure::Reset { reused, unsent }) = attempt {
            // The server closed an idle connection as we reused it: once, on a new one.
            if reused
                && !self.stale_retry_done
                && (unsent.is_some() || (self.idempotent && self.replayable))
            {
                self.stale_retry_done = true;
                self.tries -= 1;
                let service = &self.service.config.name;
                self.metrics.record_retry(service, "stale-connection");
                return Next::Again(unsent.map(|request| *request));
            }
            let attempt = Attempt::Failed(Failure::Reset { reused, unsent });
            return self.policy_retry(attempt, record);
        }
        self.policy_retry(attempt, record)
    }

    /// The route's retry policy, within the budget.
    fn policy_retry(&mut self, attempt: Attempt, record: &mut RequestRecord) -> Next {
        let Some(reason) = self.should_retry(&attempt) else {
            return self.done(attempt, record, false);
        };
        if !self.service.try_start_retry() {
            record.error = Some(format!("retry budget exhausted after {reason}"));
            return self.done(attempt, record, true);
        }
        self.metrics.record_retry(&self.service.config.name, reason);
        self.in_budget = true;
        Next::Again(match attempt {
            Attempt::Failed(Failure::Reset { unsent, .. }) => unsent.map(|request| *request),
            _ => None,
        })
    }

    /// The reason `attempt` is retried under, if the policy, the tries left and the body allow.
    fn should_retry(&self, attempt: &Attempt) -> Option<&'static str> {
        let (reason, condition) = match attempt {
            Attempt::Responded(response) if response.status().is_server_error() => {
                ("5xx", Some(RetryOn::ServerError))
            }
            Attempt::Failed(Failure::ConnectFailed) => {
                ("connect-failure", Some(RetryOn::ConnectFailure))
            }
            Attempt::Failed(Failure::Reset { .. }) => ("reset", Some(RetryOn::Reset)),
            // Whatever `retryOn` says: the per-try timeout is there to be retried.
            Attempt::Failed(Failure::TimedOut) => ("per-try-timeout", None),
            _ => return None,
        };
        let allowed = condition.is_none_or(|condition| {
            self.policy
                .is_some_and(|policy| policy.retry_on.contains(&condition))
        });
        let tries_left = self.tries < self.max_tries && Instant::now() < self.deadline;
        (allowed && tries_left && self.replayable).then_some(reason)
    }

    fn done(&self, attempt: Attempt, record: &mut RequestRecord, budget_exhausted: bool) -> Next {
        match &attempt {
            Attempt::Responded(response)
                if response.status().is_server_error() && (budget_exhausted || self.tries > 1) =>
            {
                record.flag(ResponseFlag::RetryLimitExceeded);
            }
            Attempt::Failed(Failure::ConnectFailed | Failure::Reset { .. }) if self.tries > 1 => {
                record.flag(ResponseFlag::RetryLimitExceeded);
            }
            Attempt::Failed(Failure::TimedOut) => {
                record.error = Some(format!(
                    "no response within the route timeout of {:?}",
                    self.route_timeout
                ));
            }
            _ => {}
        }
        Next::Done(attempt)
    }
}

/// Safe to send again once it may have been written.
pub fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}
