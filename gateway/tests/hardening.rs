//! Issue 18, hardening: policy, listeners, audit and files (items 4, 5, 11, 12, 13). Each test
//! is named after the item it proves and fails on the code before its fix.
