//! The CallStore conformance suite, run against every implementation.

use std::io::Write;
use std::sync::Arc;

use ivr_core::store::conformance::{self, Fixture};
use ivr_core::{MemoryCallStore, SqlCallStore};

mod memory {
    use super::*;

    async fn store() -> Option<Fixture> {
        Some(Fixture::new(Arc::new(MemoryCallStore::new())))
    }

    ivr_core::call_store_conformance!(store);

    /// MEMORY_MAX_CALLS: the memory store's bound on ended calls (the SQL stores keep every call).
    #[tokio::test]
    async fn keeps_at_most_max_ended_calls() {
        let check = conformance::keeps_at_most_max_ended_calls(Arc::new(MemoryCallStore::with_max_ended(5)), 5);
        tokio::time::timeout(std::time::Duration::from_secs(60), check).await.expect("the bound check finishes");
    }
}

mod sqlite {
    use super::*;

    async fn store() -> Option<Fixture> {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = SqlCallStore::open_sqlite(&dir.path().join("calls.db")).await.expect("open SQLite");
        Some(Fixture::new(Arc::new(store)).keeping(dir))
    }

    ivr_core::call_store_conformance!(store);
}

mod postgres {
    use super::*;

    /// A store in a schema of its own, so parallel tests and runs never see each other's rows.
    async fn store() -> Option<Fixture> {
        let Ok(url) = std::env::var("IVR_TEST_DATABASE_URL") else {
            // Written past the test harness's capture so the skip is visible in the output.
            let _ = writeln!(std::io::stderr(), "skipped: PostgreSQL store test (IVR_TEST_DATABASE_URL is not set)");
            return None;
        };
        let store = conformance::postgres_in_fresh_schema(&url).await.expect("connect to IVR_TEST_DATABASE_URL");
        Some(Fixture::new(Arc::new(store)))
    }

    ivr_core::call_store_conformance!(store);
}
