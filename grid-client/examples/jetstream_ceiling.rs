//! JetStream's own rates on this machine — the ceiling Grid's throughput is measured against
//! (`cargo xtask bench grid` runs it next to the grid benchmark, on the same nats-server).
//!
//! Async publish-with-ack into a file-store work-queue stream with a bounded window of
//! unacknowledged publishes, then pull-and-ack of every message, as a task crosses JetStream.
//! Prints one JSON line: `{"publish_per_s":…,"pull_ack_per_s":…}`.
//!
//! `cargo run --release -p grid-client --example jetstream_ceiling -- NATS_URL [CREDS] [MESSAGES]`

use async_nats::jetstream::{self, consumer, stream};
use futures::StreamExt;
use std::time::Instant;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let url = args
        .next()
        .unwrap_or_else(|| grid_client::DEFAULT_NATS_URL.into());
    let creds = args.next().filter(|c| !c.is_empty());
    let messages: usize = args.next().map_or(Ok(100_000), |n| n.parse())?;
    let client =
        grid_client::connect_with(&url, false, creds.as_deref().map(std::path::Path::new)).await?;
    let js = jetstream::new(client);
    let name = "GRID_BENCH_CEILING";
    let _ = js.delete_stream(name).await;
    let stream = js
        .create_stream(stream::Config {
            name: name.into(),
            subjects: vec!["grid.bench.>".into()],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await?;
    // A task message's size, about.
    let payload = bytes::Bytes::from(vec![7u8; 200]);
    const WINDOW: usize = 1024;
    let started = Instant::now();
    let mut pending = futures::stream::FuturesUnordered::new();
    for i in 0..messages {
        let ack = js
            .publish(format!("grid.bench.{}", i % 64), payload.clone())
            .await?;
        pending.push(IntoFuture::into_future(ack));
        if pending.len() >= WINDOW
            && let Some(ack) = pending.next().await
        {
            ack?;
        }
    }
    while let Some(ack) = pending.next().await {
        ack?;
    }
    let publish_per_s = messages as f64 / started.elapsed().as_secs_f64();

    let consumer = stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some("ceiling".into()),
            ack_policy: consumer::AckPolicy::Explicit,
            max_ack_pending: 10_000,
            ..Default::default()
        })
        .await?;
    let started = Instant::now();
    let mut taken = consumer.messages().await?;
    let mut done = 0;
    while done < messages {
        let Some(message) = taken.next().await else {
            break;
        };
        message
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .ack()
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        done += 1;
    }
    let pull_ack_per_s = done as f64 / started.elapsed().as_secs_f64();
    let _ = js.delete_stream(name).await;
    println!(
        "{}",
        serde_json::json!({"messages": messages, "publish_per_s": publish_per_s.round(), "pull_ack_per_s": pull_ack_per_s.round()})
    );
    Ok(())
}
