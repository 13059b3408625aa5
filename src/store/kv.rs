//! The storage engines under the store: sled (embedded, the default) and PostgreSQL
//! (`kv/pg.rs`). Both are the same thing to the store above: a fixed set of ordered,
//! byte-keyed trees, an id generator, and atomic transactions across trees that may run
//! their closure more than once. Everything the store guarantees is written once, over
//! this, and holds on either engine.

use std::ops::{Bound, Deref, RangeBounds};

use sled::transaction::{
    ConflictableTransactionError, TransactionError, TransactionalTree, UnabortableTransactionError,
};
use sled::{IVec, Transactional};

use super::StoreError;

pub(in crate::store) mod pg;

/// An open engine.
pub(super) enum Engine {
    Sled(sled::Db),
    Pg(pg::Pg),
}

/// One tree of an open engine.
pub(super) enum Tree {
    Sled(sled::Tree),
    Pg(pg::Pg, i16),
}

/// A stored key or value.
pub enum Val {
    Sled(IVec),
    Owned(Vec<u8>),
}

impl Deref for Val {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Val::Sled(v) => v,
            Val::Owned(v) => v,
        }
    }
}

impl AsRef<[u8]> for Val {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

/// A tree's entries in key order, fetched as the caller reads.
pub(super) type KvIter = Box<dyn Iterator<Item = Result<(Val, Val), StoreError>> + Send>;

/// How a transaction runs.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct TxOpts {
    /// On disk (and, on PostgreSQL, wherever its commit must reach) before it returns.
    pub durable: bool,
    /// Takes the append order: inbox entries become visible in the order of their
    /// numbers, across every process on the database (in one process a mutex does it).
    pub ordered: bool,
    /// The transaction is the leader's work: it commits only while this process still
    /// holds the lease (PostgreSQL; sled has one process and no lease).
    pub fenced: bool,
}

/// Why a transaction ended without committing.
pub(super) enum TxFail {
    /// The closure gave up (its own error): nothing is wrong with the engine.
    Abort(StoreError),
    /// The engine failed.
    Storage(StoreError),
}

/// An error inside a transaction.
#[derive(Debug)]
pub(super) enum TxErr {
    Abort(StoreError),
    Sled(UnabortableTransactionError),
    /// PostgreSQL found the transaction in conflict with a concurrent one: run it again.
    Retry,
    Storage(StoreError),
}

/// One tree inside a transaction.
pub(super) enum TxTree<'a> {
    Sled(&'a TransactionalTree),
    Pg(&'a (dyn pg::TxOps + 'a), i16),
}

impl TxTree<'_> {
    pub fn get(&self, key: impl AsRef<[u8]>) -> Result<Option<Val>, TxErr> {
        match self {
            TxTree::Sled(t) => Ok(t.get(key).map_err(TxErr::Sled)?.map(Val::Sled)),
            TxTree::Pg(tx, tree) => tx.get(*tree, key.as_ref()),
        }
    }

    pub fn insert(&self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) -> Result<(), TxErr> {
        match self {
            TxTree::Sled(t) => drop(
                t.insert(key.as_ref(), value.as_ref())
                    .map_err(TxErr::Sled)?,
            ),
            TxTree::Pg(tx, tree) => tx.insert(*tree, key.as_ref(), value.as_ref())?,
        }
        Ok(())
    }

    pub fn remove(&self, key: impl AsRef<[u8]>) -> Result<Option<Val>, TxErr> {
        match self {
            TxTree::Sled(t) => Ok(t.remove(key.as_ref()).map_err(TxErr::Sled)?.map(Val::Sled)),
            TxTree::Pg(tx, tree) => tx.remove(*tree, key.as_ref()),
        }
    }

    /// A fresh unique, increasing id (shared by every tree).
    pub fn generate_id(&self) -> Result<u64, TxErr> {
        match self {
            TxTree::Sled(t) => t
                .generate_id()
                .map_err(|e| TxErr::Storage(StoreError::from(e))),
            TxTree::Pg(tx, _) => tx.next_id(),
        }
    }
}

fn owned_bounds<K: AsRef<[u8]>>(r: &impl RangeBounds<K>) -> (Bound<Vec<u8>>, Bound<Vec<u8>>) {
    let own = |b: Bound<&K>| match b {
        Bound::Included(k) => Bound::Included(k.as_ref().to_vec()),
        Bound::Excluded(k) => Bound::Excluded(k.as_ref().to_vec()),
        Bound::Unbounded => Bound::Unbounded,
    };
    (own(r.start_bound()), own(r.end_bound()))
}

/// The first key after every key that starts with `prefix` (`None`: no such key).
fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

impl Tree {
    pub fn get(&self, key: impl AsRef<[u8]>) -> Result<Option<Val>, StoreError> {
        match self {
            Tree::Sled(t) => Ok(t.get(key)?.map(Val::Sled)),
            Tree::Pg(pg, tree) => pg.get(*tree, key.as_ref()),
        }
    }

    pub fn insert(&self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) -> Result<(), StoreError> {
        match self {
            Tree::Sled(t) => drop(t.insert(key.as_ref(), value.as_ref())?),
            Tree::Pg(pg, tree) => pg.insert(*tree, key.as_ref(), value.as_ref())?,
        }
        Ok(())
    }

    pub fn remove(&self, key: impl AsRef<[u8]>) -> Result<Option<Val>, StoreError> {
        match self {
            Tree::Sled(t) => Ok(t.remove(key.as_ref())?.map(Val::Sled)),
            Tree::Pg(pg, tree) => pg.remove(*tree, key.as_ref()),
        }
    }

    /// Replaces the value of `key` if it is still `old` (`None`: absent) with `new`
    /// (`None`: removes it); returns whether it did.
    pub fn compare_and_swap(
        &self,
        key: impl AsRef<[u8]>,
        old: Option<&[u8]>,
        new: Option<&[u8]>,
    ) -> Result<bool, StoreError> {
        match self {
            Tree::Sled(t) => Ok(t.compare_and_swap(key.as_ref(), old, new)?.is_ok()),
            Tree::Pg(pg, tree) => pg.compare_and_swap(*tree, key.as_ref(), old, new),
        }
    }

    pub fn range<K: AsRef<[u8]>>(&self, r: impl RangeBounds<K>) -> KvIter {
        let (from, to) = owned_bounds(&r);
        match self {
            Tree::Sled(t) => Box::new(t.range::<Vec<u8>, _>((from, to)).map(|kv| {
                kv.map(|(k, v)| (Val::Sled(k), Val::Sled(v)))
                    .map_err(Into::into)
            })),
            Tree::Pg(pg, tree) => Box::new(pg.range(*tree, from, to)),
        }
    }

    pub fn scan_prefix(&self, prefix: impl AsRef<[u8]>) -> KvIter {
        let p = prefix.as_ref().to_vec();
        match prefix_end(&p) {
            Some(end) => self.range(p..end),
            None => self.range(p..),
        }
    }

    pub fn iter(&self) -> KvIter {
        self.range::<Vec<u8>>(..)
    }

    pub fn last(&self) -> Result<Option<(Val, Val)>, StoreError> {
        match self {
            Tree::Sled(t) => Ok(t.last()?.map(|(k, v)| (Val::Sled(k), Val::Sled(v)))),
            Tree::Pg(pg, tree) => pg.last(*tree),
        }
    }

    /// Entries in the tree (counted: use for small trees, status and tests).
    pub fn len(&self) -> Result<usize, StoreError> {
        match self {
            Tree::Sled(t) => Ok(t.len()),
            Tree::Pg(pg, tree) => pg.len(*tree),
        }
    }

    pub fn is_empty(&self) -> Result<bool, StoreError> {
        match self {
            Tree::Sled(t) => Ok(t.is_empty()),
            Tree::Pg(pg, tree) => Ok(pg.first(*tree)?.is_none()),
        }
    }
}

impl Engine {
    /// The trees named `names`, in that order.
    pub fn trees(&self, names: &[&str]) -> Result<Vec<Tree>, StoreError> {
        names
            .iter()
            .enumerate()
            .map(|(i, n)| match self {
                Engine::Sled(db) => Ok(Tree::Sled(db.open_tree(n)?)),
                Engine::Pg(pg) => Ok(Tree::Pg(pg.clone(), i as i16)),
            })
            .collect()
    }

    /// A fresh unique, increasing id.
    pub fn generate_id(&self) -> Result<u64, StoreError> {
        match self {
            Engine::Sled(db) => Ok(db.generate_id()?),
            Engine::Pg(pg) => pg.next_id(),
        }
    }

    /// Appends `value` to `tree` under a fresh number, `base` + a new id + 1, and returns
    /// it. Numbers become visible in increasing order: on sled because the caller appends
    /// one at a time; on PostgreSQL, across every process on the database, because the
    /// number is drawn under the append order (one statement: the order is held only on
    /// the server, never across a round trip).
    pub fn append(&self, tree: &Tree, base: u64, value: &[u8]) -> Result<u64, StoreError> {
        match (self, tree) {
            (Engine::Sled(db), Tree::Sled(t)) => {
                let seq = base + db.generate_id()? + 1;
                t.insert(seq.to_be_bytes(), value)?;
                Ok(seq)
            }
            (Engine::Pg(pg), Tree::Pg(_, i)) => pg.append(*i, base + 1, value),
            _ => Err(StoreError::Io("a tree of another engine".into())),
        }
    }

    /// Makes every write that has returned so far durable.
    pub fn flush(&self) -> Result<(), StoreError> {
        match self {
            Engine::Sled(db) => db.flush().map(|_| ()).map_err(Into::into),
            Engine::Pg(pg) => pg.flush(),
        }
    }

    /// Runs `f` atomically over `trees` (all of the engine's, in order). `f` may run more
    /// than once (on conflict), so it must not have effects outside its trees.
    pub fn transaction<R: Send>(
        &self,
        trees: &[Tree],
        opts: TxOpts,
        f: impl Fn(&[TxTree<'_>]) -> Result<R, TxErr> + Sync,
    ) -> Result<R, TxFail> {
        match self {
            Engine::Sled(_) => sled_transaction(trees, opts, f),
            Engine::Pg(pg) => pg.transaction(opts, f),
        }
    }
}

fn sled_transaction<R>(
    trees: &[Tree],
    opts: TxOpts,
    f: impl Fn(&[TxTree<'_>]) -> Result<R, TxErr>,
) -> Result<R, TxFail> {
    let sled_trees: Vec<sled::Tree> = (trees.iter())
        .filter_map(|t| match t {
            Tree::Sled(t) => Some(t.clone()),
            Tree::Pg(..) => None,
        })
        .collect();
    let r = sled_trees.as_slice().transaction(|view| {
        let txs: Vec<TxTree<'_>> = view.iter().map(TxTree::Sled).collect();
        let r = f(&txs).map_err(|e| match e {
            TxErr::Abort(e) | TxErr::Storage(e) => ConflictableTransactionError::Abort(e),
            TxErr::Sled(u) => u.into(),
            TxErr::Retry => ConflictableTransactionError::Conflict,
        })?;
        if opts.durable {
            view[0].flush();
        }
        Ok(r)
    });
    r.map_err(|e| match e {
        TransactionError::Abort(e) => TxFail::Abort(e),
        TransactionError::Storage(e) => TxFail::Storage(e.into()),
    })
}
