//! ivr-server: the REST API over ivr-core. Not built yet; see the open issue for ivr-server.

fn main() {
    eprintln!("ivr-server is not implemented yet; try `cargo run --example store_tour`");
    std::process::exit(2);
}
