//! The HTTP floor of the benchmarks: a warp server that responds to every request
//! with the same JSON body, shaped like a ticket response.
//!
//! It runs on the same multi-threaded tokio runtime and warp version as
//! wsticket, so its server CPU per request is the cost of HTTP parsing,
//! routing and writing a small JSON response, without token verification or
//! storage. `docs/BENCHMARKS.md` compares wsticket's CPU per ticket with it.
//!
//! ```text
//! cargo run --release --example fixed_body -- --listen 127.0.0.1:8181
//! ```

use std::net::SocketAddr;

use clap::Parser;
use warp::Filter;

#[derive(Parser)]
struct Args {
    /// Address to listen on; keep it on loopback.
    #[arg(long, default_value = "127.0.0.1:8181")]
    listen: SocketAddr,
}

/// A body of the size and shape of a ticket response.
const BODY: &str = r#"{"ticket":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA","expires_at":"2026-12-04T00:00:30.000Z","expires_in":30}"#;

fn main() {
    let args = Args::parse();
    let runtime = tokio::runtime::Runtime::new().expect("the tokio runtime starts");
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .unwrap_or_else(|err| panic!("cannot listen on {}: {err}", args.listen));
        let addr = listener
            .local_addr()
            .expect("a bound listener has an address");
        println!("listening on {addr}");
        let route = warp::any().map(|| {
            warp::http::Response::builder()
                .header("content-type", "application/json")
                .header("cache-control", "no-store")
                .body(BODY)
        });
        warp::serve(route).incoming(listener).run().await;
    });
}
