//! optout-sync connector for hubspot (in progress).
