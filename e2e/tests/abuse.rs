//! The abuse suite in CI: `chat-bench abuse --check` against a real node (slowloris on HTTP and
//! WebSocket, readers that never read, floods of joins, publishes and pings, oversize and
//! endless fragmented frames, 10 000 rooms). It fails unless every abuser got its documented
//! outcome, the well-behaved clients got every message, and the node's peak RSS stayed bounded;
//! the figures it prints are in docs/benchmarks.md ("Abuse").

use std::time::Duration;

#[tokio::test]
async fn every_abuser_gets_its_documented_close_and_others_keep_chatting() -> anyhow::Result<()> {
    let output = tokio::time::timeout(
        Duration::from_secs(300),
        tokio::process::Command::new(chat_e2e::bench_binary())
            .args(["abuse", "--phase-secs", "3", "--check", "--node-bin"])
            .arg(chat_e2e::node_binary())
            .kill_on_drop(true)
            .output(),
    )
    .await??;
    let (stdout, stderr) = (String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    println!("{stdout}");
    anyhow::ensure!(output.status.success(), "chat-bench abuse --check failed:\n{stdout}\n{stderr}");
    anyhow::ensure!(stdout.contains("| 10k-rooms |"), "every phase ran:\n{stdout}");
    Ok(())
}
