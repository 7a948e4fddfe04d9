//! Faults of the data directory: bad paths at start, a full disk at run time.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

#[tokio::test]
async fn data_dir_that_is_a_file_is_named_at_start() {
    let jwks = JwksServer::start(default_jwks()).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("not-a-directory");
    std::fs::write(&file, b"keep me").expect("write file");

    let output = command(&ServerOptions::new(jwks.url(), &file))
        .output()
        .expect("run wsticket");
    assert!(!output.status.success(), "start must fail");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&file.display().to_string()),
        "names the path: {stderr}"
    );
    assert_eq!(std::fs::read(&file).expect("file still there"), b"keep me");
}

#[tokio::test]
async fn undecodable_record_stops_start_and_keeps_data() {
    let jwks = JwksServer::start(default_jwks()).await;
    let dir = tempfile::tempdir().expect("temp dir");
    {
        // A record that is not a ticket record, written where tickets live.
        let db = sled::open(dir.path()).expect("open sled");
        db.insert([7u8; 32], b"\xff\xff not a record".to_vec())
            .expect("insert");
        db.flush().expect("flush");
    }
    let output = command(&ServerOptions::new(jwks.url(), dir.path()))
        .output()
        .expect("run wsticket");
    assert!(!output.status.success(), "start must fail");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&dir.path().display().to_string()),
        "names the path: {stderr}"
    );

    let db = sled::open(dir.path()).expect("reopen sled");
    assert!(
        db.get([7u8; 32]).expect("get").is_some(),
        "nothing was deleted"
    );
}

/// A small tmpfs mounted on a temporary directory: a disk that can be filled
/// and then given more room. Mounting needs root; CI runs as root.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> Option<SmallDisk> {
        Self::mount_with(&format!("size={size}"))
    }

    fn mount_with(options: &str) -> Option<SmallDisk> {
        let dir = tempfile::tempdir().expect("temp dir");
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "tmpfs"])
            .arg(dir.path())
            .status()
            .ok()?;
        status.success().then_some(SmallDisk { dir })
    }

    fn resize(&self, size: &str) {
        let status = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(self.dir.path())
            .status()
            .expect("run mount");
        assert!(status.success(), "tmpfs resize failed");
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

#[tokio::test]
async fn full_disk_answers_503_then_recovers() {
    let Some(disk) = SmallDisk::mount("2m") else {
        // Without root there is no way to make a disk full on purpose.
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "CI must run this test as root"
        );
        eprintln!("full_disk_answers_503_then_recovers: not run, mounting a tmpfs needs root");
        return;
    };
    let jwks = JwksServer::start(default_jwks()).await;
    let data_dir = disk.dir.path().join("store");
    let options = ServerOptions::new(jwks.url(), &data_dir).args(&[
        "--rate-limit",
        "1000000",
        "--ticket-ttl",
        "10m",
    ]);
    let server = Server::start(options).await;
    let token = Signer::token("disk-filler");
    let used = ticket_for(&server, &token).await;
    let unused = ticket_for(&server, &token).await;

    let authorization = format!("Bearer {token}");
    let mut failure = None;
    for _ in 0..50_000 {
        let answer = post_ticket(&server, &[("authorization", &authorization)]).await;
        if answer.status != 200 {
            failure = Some(answer);
            break;
        }
    }
    let failure = failure.expect("the 2 MiB disk filled up before 50,000 tickets");
    assert_eq!(failure.status, 503);
    assert_eq!(failure.error_code(), "store_unavailable");
    assert!(
        server
            .events("store_error")
            .iter()
            .any(|e| e["level"] == "ERROR"),
        "the write failure is logged at ERROR"
    );

    // Consumptions that cannot be written are refused, never accepted.
    match connect_with_ticket(&server, &used).await {
        Ok(_) => {}
        Err(rejection) => assert_eq!(rejection.code, "store_unavailable"),
    }

    disk.resize("64m");
    let mut recovered = false;
    for _ in 0..50 {
        let answer = post_ticket(&server, &[("authorization", &authorization)]).await;
        if answer.status == 200 {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(recovered, "issuance works again once the disk has room");
    assert!(connect_with_ticket(&server, &unused).await.is_ok());
    match connect_with_ticket(&server, &unused).await {
        Err(rejection) => assert_eq!(rejection.code, "ticket_already_used"),
        Ok(_) => panic!("a used ticket was accepted twice"),
    }
    drop(server);
}

#[tokio::test]
async fn read_only_data_dir_is_named_at_start() {
    let Some(disk) = SmallDisk::mount_with("size=1m,ro") else {
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "CI must run this test as root"
        );
        eprintln!("read_only_data_dir_is_named_at_start: not run, mounting a tmpfs needs root");
        return;
    };
    let jwks = JwksServer::start(default_jwks()).await;
    let data_dir = disk.dir.path().join("store");
    let output = command(&ServerOptions::new(jwks.url(), &data_dir))
        .output()
        .expect("run wsticket");
    assert!(!output.status.success(), "start must fail");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&data_dir.display().to_string()),
        "names the path: {stderr}"
    );
}
