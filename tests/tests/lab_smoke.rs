//! Proves the lab itself works: pods reach each other over IPv4, IPv6 and IPv4-mapped IPv6,
//! processes land in the right cgroup and user, and teardown removes everything, even when
//! the test body panics.

use std::net::{IpAddr, SocketAddr};
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use sidecar_tests::{ConnectReport, Lab, require_root, wait_for_http_ok, wait_for_tcp};

const LABTOOL: &str = env!("CARGO_BIN_EXE_labtool");
const READY: Duration = Duration::from_secs(5);

#[test]
fn pods_reach_each_other_and_teardown_removes_everything() -> anyhow::Result<()> {
    require_root();
    let lab = Lab::new("pods_reach_each_other_and_teardown_removes_everything")?;
    let client = lab.add_pod("client")?;
    let server = lab.add_pod("server")?;

    let echo = server
        .command(LABTOOL)
        .args(["echo-server", "--listen", "[::]:8080"])
        .spawn()?;
    echo.wait_for_stdout("listening [::]:8080", READY)?;
    wait_for_tcp(&server, SocketAddr::new(server.ipv4().into(), 8080), READY)?;

    let targets = [
        (IpAddr::from(server.ipv4()), IpAddr::from(client.ipv4())),
        (IpAddr::from(server.ipv6()), IpAddr::from(client.ipv6())),
        (
            IpAddr::from(server.ipv4().to_ipv6_mapped()),
            IpAddr::from(client.ipv4()),
        ),
    ];
    for (server_ip, expected_client_ip) in targets {
        let target = SocketAddr::new(server_ip, 8080);
        let output = client
            .command(LABTOOL)
            .args(["connect", &target.to_string(), "--payload-bytes", "70000"])
            .run()?;
        let report = ConnectReport::from_output(&output)?;
        assert!(report.echo_ok, "{report:?}");
        assert_eq!(report.peer, target);
        assert_eq!(report.server.received, 70_000);
        assert_eq!(
            report.server.peer.ip().to_canonical(),
            expected_client_ip,
            "{report:?}"
        );
        assert_eq!(
            report.server.local.ip().to_canonical(),
            server_ip.to_canonical()
        );
    }
    assert!(
        echo.stdout_text()
            .lines()
            .filter(|line| line.starts_with('{'))
            .count()
            >= 3
    );

    let refused = client
        .command(LABTOOL)
        .args(["connect", &format!("{}:9", server.ipv4())])
        .run()?;
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("connection refused"), "{stderr}");

    let web = server
        .command(LABTOOL)
        .args(["http-server", "--listen", "[::]:8081", "--name", "web"])
        .spawn()?;
    let response = wait_for_http_ok(&client, &format!("http://[{}]:8081/", server.ipv6()), READY)?;
    assert!(
        response.body.starts_with("hello from web: you are [fd18::"),
        "{}",
        response.body
    );
    drop(web);

    // The proxy layout: UID 1337 in a child cgroup of the pod.
    let proxy_cgroup = client.cgroup_child("proxy")?;
    let identity = client
        .command("sh")
        .args(["-c", "id -u; id -G; cat /proc/self/cgroup"])
        .in_cgroup(&proxy_cgroup)
        .as_user(1337, 1337)
        .run_success()?;
    let identity = String::from_utf8_lossy(&identity.stdout);
    let cgroup_line = format!("0::/sidecar-lab/{}/client/proxy", lab.id());
    assert!(identity.starts_with("1337\n1337\n"), "{identity}");
    assert!(
        identity.lines().any(|line| line == cgroup_line),
        "{identity}"
    );

    let sibling = lab.sibling_cgroup("mesh-proxy")?;
    let leftovers = [
        client.netns_path(),
        server.netns_path(),
        client.cgroup().to_path_buf(),
        proxy_cgroup,
        sibling,
        lab.cgroup().to_path_buf(),
        lab.dir().to_path_buf(),
    ];
    assert!(leftovers.iter().all(|path| path.exists()));
    drop(echo);
    lab.teardown()?;
    assert_all_gone(&leftovers);
    Ok(())
}

#[test]
fn a_panicking_test_body_still_tears_down() {
    require_root();
    let created: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
    let spawned_pids: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let outcome = panic::catch_unwind(AssertUnwindSafe(|| {
        let lab = Lab::new("a_panicking_test_body_still_tears_down").unwrap();
        let pod = lab.add_pod("victim").unwrap();
        let tracked = pod.command("sleep").arg("60").spawn().unwrap();
        // A daemon the lab does not track: only the cgroup sweep can find it.
        let untracked = pod
            .command("sh")
            .args(["-c", "sleep 60 >/dev/null 2>&1 & echo $!"])
            .run_success()
            .unwrap();
        spawned_pids.lock().unwrap().extend([
            tracked.pid().to_string(),
            String::from_utf8_lossy(&untracked.stdout).trim().to_owned(),
        ]);
        created.lock().unwrap().extend([
            pod.netns_path(),
            pod.cgroup().to_path_buf(),
            lab.cgroup().to_path_buf(),
            lab.dir().to_path_buf(),
        ]);
        std::mem::forget(tracked); // the lab alone must stop it
        panic!("deliberate failure inside a lab test");
    }));
    assert!(outcome.is_err(), "the body was meant to panic");
    let created = created.into_inner().unwrap();
    assert_eq!(created.len(), 4);
    assert_all_gone(&created);
    for pid in spawned_pids.into_inner().unwrap() {
        assert!(!is_alive(&pid), "process {pid} survived teardown");
    }
}

/// Zombies count as dead: an orphan's reaping by init may lag its SIGKILL.
fn is_alive(pid: &str) -> bool {
    std::fs::read_to_string(Path::new("/proc").join(pid).join("stat")).is_ok_and(|stat| {
        stat.rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z'))
    })
}

fn assert_all_gone(paths: &[PathBuf]) {
    for path in paths {
        assert!(!path.exists(), "{} survived teardown", path.display());
    }
}
