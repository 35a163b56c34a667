//! Scenarios 6 and 9: authorization under faults. The row-level-security checks walcast runs
//! on its authorization pool fail (connections killed) or misbehave (a policy that raises or
//! sleeps for one identity); the other identities must not notice.

use std::time::Duration;

use walcast_faults::knobs::{knob_secs, let_run};
use walcast_faults::schema::policy_fault;
use walcast_faults::{Expect, Options, Scenario};

/// 6. The authorization pool's connections are terminated again and again while alice and
///    bob (RLS on `secured`) receive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authz_connections_killed() {
    let fault = "pg_terminate_backend on every connection with application_name 'walcast authz', \
                 every 500 ms for 3 s";
    let mut s = Scenario::start(Options::new("authz-connections-killed", fault)).await;
    s.before_fault().await;
    s.fault_begin(fault);
    let mut killed = 0;
    for _ in 0..6 {
        match s
            .admin
            .query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE application_name = 'walcast authz'",
                &[],
            )
            .await
        {
            Ok(rows) => killed += rows.len(),
            Err(e) => s.fail(format!("terminating authz connections: {e}")),
        }
        let_run(Duration::from_millis(500)).await;
    }
    if killed == 0 {
        s.fail("found no 'walcast authz' connection to terminate");
    }
    s.note(format!("{killed} authz connections terminated"));
    s.fault_end();
    s.recover(Duration::from_secs(60)).await;
    s.after_fault().await;
    s.finish(Expect::no_loss()).await;
}

async fn policy(name: &str, action: &str, what: &str) {
    let secs = knob_secs("FAULTS_POLICY_SECS", 6);
    let fault = format!(
        "secured's policy {what} for mallory (RLS subscriber owning no row) for {} s",
        secs.as_secs()
    );
    let mut opts = Options::new(name, &fault);
    opts.policy_function = true;
    opts.extra_secured = vec!["mallory".into()];
    let mut s = Scenario::start(opts).await;
    s.before_fault().await;
    s.fault_begin(&fault);
    if let Err(e) = s
        .admin
        .batch_execute(&policy_fault("mallory", action))
        .await
    {
        s.fail(format!("installing the faulty policy: {e}"));
    }
    let_run(secs).await;
    // Back to the plain policy.
    if let Err(e) = s
        .admin
        .batch_execute(&policy_fault("nobody-at-all", "NULL;"))
        .await
    {
        s.fail(format!("restoring the policy: {e}"));
    }
    s.fault_end();
    s.recover(Duration::from_secs(60)).await;
    s.after_fault().await;
    let mut expect = Expect::no_loss();
    expect.system_error_for = vec!["mallory".into()];
    // Its bindings are stopped; whether its channel stays joined is not specified.
    expect.may_disconnect = vec!["mallory".into()];
    expect.latency_during_fault = Some((vec!["alice".into(), "bob".into(), "carol".into()], 1000));
    s.finish(expect).await;
}

/// 9a. The policy raises for one identity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_raises() {
    policy(
        "policy-raises",
        "RAISE EXCEPTION 'policy evaluation failed for mallory';",
        "raises",
    )
    .await;
}

/// 9b. The policy sleeps 5 s for one identity (past walcast's 2 s statement timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_sleeps() {
    policy("policy-sleeps", "PERFORM pg_sleep(5);", "sleeps 5 s").await;
}
