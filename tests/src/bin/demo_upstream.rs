//! The demo upstream of `make run`: answers 200 to every request.

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8080".to_owned());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    eprintln!("demo upstream listening on {addr}");
    sluice_e2e::upstream::serve(listener).await
}
