//! Issue 18, hardening of the proxy and the CA: certificate validity on every handshake,
//! the preamble checked against the certificate, reuse and cancel per identity, bounds
//! (items 2, 3, 6, 7, 8). Each test is named after the item it proves and fails on the code
//! before its fix.
