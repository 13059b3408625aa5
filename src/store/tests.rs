//! Store tests. Every test of the store's behaviour runs on both engines, as
//! `<test>::sled` and `<test>::postgres` (see [`on_both!`]): `suite` (reopening, schemas,
//! transactions, the inbox, retention, the gate's reads) and `crash` (SIGKILL at seeded
//! moments). `sled_files` is about sled's own files (damage, a lost log tail, the marker);
//! `pg` about what only PostgreSQL has (several instances on one database, its SQL layout,
//! the leader's fence).
//!
//! The PostgreSQL half needs a server: `OPTOUT_TEST_PG` is an admin URL, and each test gets
//! a database of its own. Without it those tests say they are skipped and pass, except
//! under CI, where they fail.

use super::*;
use crate::store::testing::Opener;

/// Instantiates each suite test `name(&Opener)` as `name::sled` and `name::postgres`.
macro_rules! on_both {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[test]
            fn sled() {
                super::$name(&$crate::store::testing::Opener::sled());
            }

            #[test]
            fn postgres() {
                if let Some(o) = $crate::store::testing::Opener::postgres() {
                    super::$name(&o);
                }
            }
        }
    )*};
}

/// As [`on_both!`], for `async fn name(&Opener)` on a multi-threaded runtime.
macro_rules! on_both_async {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sled() {
                super::$name(&$crate::store::testing::Opener::sled()).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                if let Some(o) = $crate::store::testing::Opener::postgres() {
                    super::$name(&o).await;
                }
            }
        }
    )*};
}

mod crash;
mod format;
mod pg;
mod sled_files;
mod suite;
