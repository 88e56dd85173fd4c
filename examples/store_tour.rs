//! A tour of the call model and the embedded SQLite store: one call accepted, followed to its
//! end, and read back with its history.
//!
//! `cargo run --example store_tour [path/to/calls.db]` (default: `ivr-tour.db` in the
//! system's temp directory).

use ivr_core::call::now;
use ivr_core::store::conformance::new_call;
use ivr_core::{Call, CallId, CallQuery, CallStore, FailureReason, Hangup, SqlCallStore, Step, Transition};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args().nth(1).map(Into::into).unwrap_or_else(|| std::env::temp_dir().join("ivr-tour.db"));
    let store = SqlCallStore::open_sqlite(&path).await?;
    println!("store: SQLite at {}", path.display());

    let call = Call::new(CallId::new(), new_call("+15550000001"), now());
    store.insert(&call).await?;
    println!("accepted {} for {} as {}", call.call_id, call.spec.phone_number, call.status);

    // What the call manager would apply as ARI's events come in.
    let steps = [
        Transition::new(Step::Dialing, "originate accepted").channel("PJSIP/+15550000001@trunk-00000001"),
        Transition::new(Step::Ringing, "ChannelStateChange Ringing"),
        Transition::new(Step::Answered, "StasisStart"),
        Transition::new(Step::Ringing, "a late ChannelStateChange Ringing"),
        Transition::new(Step::Ended { reason_if_unanswered: FailureReason::Lost }, "ChannelDestroyed")
            .hangup(Hangup { code: 16, text: "Normal Clearing".into() }),
    ];
    for step in &steps {
        match store.apply(call.call_id, step).await? {
            ivr_core::Applied::Changed(call) => println!("{:<36} -> {}", step.cause, call.status),
            ivr_core::Applied::Ignored { why, .. } => println!("{:<36} -> ignored: {why}", step.cause),
        }
    }

    let call = store.get(call.call_id).await?.expect("the call was stored");
    println!("\nfinal: {} (hangup {:?}), talked {:.3}s", call.status, call.hangup, call.duration().unwrap_or(0.0));
    for entry in &call.history {
        println!("  {}  {:<9}  {}", entry.at, entry.status, entry.cause);
    }
    let page = store.list(&CallQuery { limit: 5, ..CallQuery::default() }).await?;
    println!("\n{} most recent calls in this store:", page.calls.len());
    for call in page.calls {
        println!("  {}  {}  {}", call.created_at, call.spec.phone_number, call.status);
    }
    Ok(())
}
