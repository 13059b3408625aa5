//! optout-sync connector for whatsapp (in progress).
