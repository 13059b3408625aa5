//! optout-sync connector for webhook (in progress).
