//! Test workloads that run inside endpoints: an HTTP echo server and a request client.
//!
//! The lab and the end-to-end tests need to see *which* backend answered a request (cluster,
//! node, endpoint) and which client address it saw, and to count answers over many requests.
//! Both sides are deliberately tiny HTTP/1.1 (one request per connection, `Connection: close`),
//! so every request is a new connection, the unit that service load-balancing decides on.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::output::{Format, OutputArgs};

#[derive(Debug, clap::Subcommand)]
pub enum WorkloadCommand {
    /// Serve HTTP on PORT, answering every request with JSON naming this endpoint and the client.
    Echo(EchoArgs),
    /// Send COUNT HTTP GET requests to URL (one connection each) and summarise who answered.
    Request(RequestArgs),
}

#[derive(Debug, clap::Args)]
pub struct EchoArgs {
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0:8080")]
    listen: SocketAddr,
    /// Cluster name reported in answers.
    #[arg(long, env = "MESHD_CLUSTER")]
    cluster: String,
    /// Node name reported in answers.
    #[arg(long, env = "MESHD_NODE")]
    node: String,
    /// Endpoint name reported in answers.
    #[arg(long, env = "MESHD_ENDPOINT")]
    endpoint: String,
}

#[derive(Debug, clap::Args)]
pub struct RequestArgs {
    /// Target as `http://IP:PORT/PATH` (or `IP:PORT`).
    url: String,
    /// Number of requests, each on a new connection.
    #[arg(long, short = 'n', default_value_t = 1)]
    count: u32,
    /// Per-request timeout in milliseconds.
    #[arg(long, default_value_t = 2000)]
    timeout_ms: u64,
    /// Pause between requests in milliseconds.
    #[arg(long, default_value_t = 0)]
    interval_ms: u64,
    /// Connections a request may try: a request that fails is tried again on a new connection
    /// (a new source port) up to this many times in all; the failures a retry made good are
    /// counted as `retried` and listed under `retry_errors`, not as failures.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=10))]
    attempts: u32,
    #[command(flatten)]
    output: OutputArgs,
}

/// What the echo server answers.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct EchoReply {
    pub cluster: String,
    pub node: String,
    pub endpoint: String,
    /// The client address as the server saw it (after any NAT).
    pub client: String,
    /// The address the connection arrived on.
    pub server: String,
}

/// Summary printed by `workload request`.
#[derive(Debug, Serialize)]
struct RequestSummary {
    target: String,
    sent: u32,
    ok: u32,
    failed: u32,
    /// Answers counted per cluster.
    by_cluster: BTreeMap<String, u32>,
    /// Answers counted per `cluster/endpoint`.
    by_endpoint: BTreeMap<String, u32>,
    /// First few errors, for diagnosis.
    errors: Vec<String>,
    /// Requests answered only on a later attempt (`--attempts`).
    retried: u32,
    /// First few errors of attempts a later one made good.
    retry_errors: Vec<String>,
    /// Every reply in order (for failover measurements).
    replies: Vec<Option<EchoReply>>,
    /// Latency of each successful request in microseconds, in order.
    latency_us: Vec<u64>,
}

pub fn run(cmd: WorkloadCommand) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    match cmd {
        WorkloadCommand::Echo(args) => rt.block_on(echo(args)),
        WorkloadCommand::Request(args) => rt.block_on(request(args)),
    }
}

async fn echo(args: EchoArgs) -> anyhow::Result<ExitCode> {
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    tracing::info!(listen = %args.listen, "echo server ready");
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                continue;
            }
        };
        let reply = EchoReply {
            cluster: args.cluster.clone(),
            node: args.node.clone(),
            endpoint: args.endpoint.clone(),
            client: peer.to_string(),
            server: stream
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_default(),
        };
        tokio::spawn(async move {
            if let Err(e) = serve_one(stream, &reply).await {
                tracing::debug!(client = %peer, error = %e, "request failed");
            }
        });
    }
}

async fn serve_one(mut stream: TcpStream, reply: &EchoReply) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    // Read the request head; bodies are not expected (GET only) and are ignored.
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 16 * 1024 {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = serde_json::to_vec(reply).map_err(std::io::Error::other)?;
    let head = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(&body).await?;
    stream.shutdown().await
}

/// Splits `http://host:port/path` into the socket address and path.
fn parse_url(url: &str) -> anyhow::Result<(SocketAddr, String)> {
    let rest = url.strip_prefix("http://").unwrap_or(url);
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].to_string()),
        None => (rest, "/".to_string()),
    };
    let addr: SocketAddr = authority
        .parse()
        .with_context(|| format!("URL {url:?}: {authority:?} is not IP:PORT"))?;
    Ok((addr, path))
}

/// One GET on a fresh connection.
pub async fn get_once(
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> anyhow::Result<EchoReply> {
    // How far the request got, for the timeout's message: an unanswered SYN and a lost answer
    // are different faults.
    let reached = std::cell::Cell::new(None::<SocketAddr>);
    let work = async {
        let mut stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        reached.set(stream.local_addr().ok());
        let req = format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n");
        stream.write_all(req.as_bytes()).await?;
        let mut resp = Vec::new();
        stream.read_to_end(&mut resp).await?;
        let text = String::from_utf8_lossy(&resp);
        let (head, body) = text
            .split_once("\r\n\r\n")
            .with_context(|| format!("{addr}: truncated HTTP response"))?;
        if !head.starts_with("HTTP/1.1 200") {
            bail!("{addr}: {}", head.lines().next().unwrap_or(""));
        }
        serde_json::from_str(body).with_context(|| format!("{addr}: answer is not echo JSON"))
    };
    let answer = tokio::time::timeout(timeout, work).await;
    answer.with_context(|| match reached.get() {
        Some(local) => {
            format!("{addr}: no answer within {timeout:?} (connected from {local}, request sent)")
        }
        None => format!("{addr}: no answer within {timeout:?} (not connected)"),
    })?
}

async fn request(args: RequestArgs) -> anyhow::Result<ExitCode> {
    let (addr, path) = parse_url(&args.url)?;
    let timeout = Duration::from_millis(args.timeout_ms);
    let mut summary = RequestSummary {
        target: args.url.clone(),
        sent: 0,
        ok: 0,
        failed: 0,
        by_cluster: BTreeMap::new(),
        by_endpoint: BTreeMap::new(),
        errors: Vec::new(),
        retried: 0,
        retry_errors: Vec::new(),
        replies: Vec::new(),
        latency_us: Vec::new(),
    };
    for i in 0..args.count {
        if i > 0 && args.interval_ms > 0 {
            tokio::time::sleep(Duration::from_millis(args.interval_ms)).await;
        }
        summary.sent += 1;
        let started = Instant::now();
        let mut answer = get_once(addr, &path, timeout).await;
        for _ in 1..args.attempts {
            let Err(e) = &answer else { break };
            let error = format!("{e:#}");
            answer = get_once(addr, &path, timeout).await;
            if answer.is_ok() {
                summary.retried += 1;
                if summary.retry_errors.len() < 5 {
                    summary.retry_errors.push(error);
                }
            }
        }
        match answer {
            Ok(reply) => {
                summary.ok += 1;
                summary
                    .latency_us
                    .push(started.elapsed().as_micros() as u64);
                *summary.by_cluster.entry(reply.cluster.clone()).or_default() += 1;
                *summary
                    .by_endpoint
                    .entry(format!("{}/{}", reply.cluster, reply.endpoint))
                    .or_default() += 1;
                summary.replies.push(Some(reply));
            }
            Err(e) => {
                summary.failed += 1;
                if summary.errors.len() < 5 {
                    summary.errors.push(format!("{e:#}"));
                }
                summary.replies.push(None);
            }
        }
    }
    match args.output.format {
        Format::Json => println!("{}", serde_json::to_string(&summary)?),
        Format::Table => {
            println!(
                "{}: {} sent, {} ok, {} failed",
                summary.target, summary.sent, summary.ok, summary.failed
            );
            for (endpoint, n) in &summary.by_endpoint {
                println!("  {endpoint:<30} {n}");
            }
            for e in &summary.errors {
                println!("  error: {e}");
            }
            for e in &summary.retry_errors {
                println!("  retried after: {e}");
            }
        }
    }
    Ok(if summary.failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        let (addr, path) = parse_url("http://10.0.0.1:80/x").unwrap();
        assert_eq!(addr, "10.0.0.1:80".parse().unwrap());
        assert_eq!(path, "/x");
        let (_, path) = parse_url("127.0.0.1:8080").unwrap();
        assert_eq!(path, "/");
        assert!(parse_url("http://name:80/").is_err());
    }

    #[tokio::test]
    async fn echo_round_trip_on_loopback() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (stream, peer) = listener.accept().await.unwrap();
            let reply = EchoReply {
                cluster: "c1".into(),
                node: "n1".into(),
                endpoint: "echo-1".into(),
                client: peer.to_string(),
                server: addr.to_string(),
            };
            serve_one(stream, &reply).await.unwrap();
        });
        let reply = get_once(addr, "/", Duration::from_secs(5)).await.unwrap();
        server.await.unwrap();
        assert_eq!(reply.cluster, "c1");
        assert_eq!(reply.endpoint, "echo-1");
        assert!(reply.client.starts_with("127.0.0.1:"), "{}", reply.client);
    }
}
