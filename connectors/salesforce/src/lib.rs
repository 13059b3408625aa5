//! optout-sync connector for salesforce (in progress).
