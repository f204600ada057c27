//! Issue 18, hardening of the node: identity from cgroups only under the kubelet's roots,
//! certificate fetching and cgroup walks off the data plane, bounded eBPF maps (items 1, 9, 10).
//! Each test is named after the item it proves and fails on the code before its fix.
