use super::*;

const UID: &str = "2c48913c-b29f-11e7-9350-020968147796";
const UID_: &str = "2c48913c_b29f_11e7_9350_020968147796";
const OTHER_UID: &str = "daa5c7ee-3484-4533-af39-3591564fd03e";
const CID: &str = "9bca8d63d5fa610783847915bcff0ecac1273e5b4bed3f6fa1b07350e0135961";
const OTHER_CID: &str = "aff34703e5e1f89443e9a1bffcc80f43f74d4808a2dd22c8f88c08547b323934";

/// The default roots of both drivers, a test prefix and kind's layouts.
fn kubelet() -> KubeletCgroups {
    KubeletCgroups::new(&[
        "/kubepods.slice".to_owned(),
        "/kubepods".to_owned(),
        "/dbgw-test-1234/kubepods.slice".to_owned(),
        "/kubelet.slice/kubelet-kubepods.slice".to_owned(),
        format!("/docker/{OTHER_CID}/kubepods"),
    ])
    .unwrap()
}

fn outside(path: &str) -> String {
    match kubelet().parse(path) {
        Err(e @ IdentityError::OutsideKubeletRoots { .. }) => e.to_string(),
        other => panic!("{path}: expected OutsideKubeletRoots, got {other:?}"),
    }
}

fn pod(path: &str) -> PodContainer {
    match kubelet().parse(path) {
        Ok(Some(p)) => p,
        other => panic!("{path}: {other:?}"),
    }
}

fn expect(path: &str, uid: &str, cid: Option<&str>, qos: Option<&str>) {
    assert_eq!(
        pod(path),
        PodContainer {
            pod_uid: uid.to_owned(),
            container_id: cid.map(str::to_owned),
            qos: qos.map(str::to_owned),
        },
        "{path}"
    );
}

fn bad(path: &str) -> String {
    match kubelet().parse(path) {
        Err(e @ IdentityError::BadCgroupPath { .. }) => e.to_string(),
        other => panic!("{path}: expected BadCgroupPath, got {other:?}"),
    }
}

fn conflict(path: &str) -> String {
    match kubelet().parse(path) {
        Err(e @ IdentityError::ConflictingCgroupPath { .. }) => e.to_string(),
        other => panic!("{path}: expected ConflictingCgroupPath, got {other:?}"),
    }
}

#[test]
fn containerd_systemd_driver_all_qos_classes() {
    let base = "/kubepods.slice";
    expect(
        &format!(
            "{base}/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope"
        ),
        UID,
        Some(CID),
        Some("burstable"),
    );
    expect(
        &format!(
            "{base}/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/cri-containerd-{CID}.scope"
        ),
        UID,
        Some(CID),
        Some("besteffort"),
    );
    expect(
        &format!("{base}/kubepods-pod{UID_}.slice/cri-containerd-{CID}.scope"),
        UID,
        Some(CID),
        Some("guaranteed"),
    );
}

#[test]
fn crio_systemd_driver_and_conmon_is_not_a_container() {
    let pod_slice =
        format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice");
    expect(
        &format!("{pod_slice}/crio-{CID}.scope"),
        UID,
        Some(CID),
        Some("burstable"),
    );
    expect(
        &format!("{pod_slice}/crio-conmon-{CID}.scope"),
        UID,
        None,
        Some("burstable"),
    );
}

#[test]
fn docker_systemd_driver() {
    expect(
        &format!(
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/docker-{CID}.scope"
        ),
        UID,
        Some(CID),
        Some("besteffort"),
    );
}

#[test]
fn cgroupfs_driver_containerd_docker_and_crio() {
    expect(
        &format!("/kubepods/burstable/pod{UID}/{CID}"),
        UID,
        Some(CID),
        Some("burstable"),
    );
    expect(
        &format!("/kubepods/besteffort/pod{UID}/{CID}"),
        UID,
        Some(CID),
        Some("besteffort"),
    );
    expect(
        &format!("/kubepods/pod{UID}/{CID}"),
        UID,
        Some(CID),
        Some("guaranteed"),
    );
    expect(
        &format!("/kubepods/burstable/pod{UID}/crio-{CID}"),
        UID,
        Some(CID),
        Some("burstable"),
    );
}

#[test]
fn pod_level_cgroup_gives_the_pod_only() {
    expect(
        &format!("/kubepods/burstable/pod{UID}"),
        UID,
        None,
        Some("burstable"),
    );
    expect(
        &format!("/kubepods.slice/kubepods-pod{UID_}.slice"),
        UID,
        None,
        Some("guaranteed"),
    );
}

#[test]
fn pod_under_a_prefix_is_found() {
    expect(
        &format!(
            "/dbgw-test-1234/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope"
        ),
        UID,
        Some(CID),
        Some("burstable"),
    );
    // kind, systemd driver: kubelet's cgroup root is /kubelet.
    expect(
        &format!(
            "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{UID_}.slice/cri-containerd-{CID}.scope"
        ),
        UID,
        Some(CID),
        Some("besteffort"),
    );
    // kind, cgroupfs driver: the node's own container id sits above the pod and is ignored.
    expect(
        &format!("/docker/{OTHER_CID}/kubepods/besteffort/pod{UID}/{CID}"),
        UID,
        Some(CID),
        Some("besteffort"),
    );
    // A bare `pod<uid>` outside the kubelet's roots is an imitation, not a pod.
    outside(&format!("/dbgw-test-7/pod{UID}/{CID}"));
}

#[test]
fn pod_uid_is_normalised_to_lower_case_dashes() {
    let upper = UID_.to_ascii_uppercase();
    expect(
        &format!("/kubepods.slice/kubepods-pod{upper}.slice"),
        UID,
        None,
        Some("guaranteed"),
    );
    expect(
        &format!("/kubepods/pod{}", UID.to_ascii_uppercase()),
        UID,
        None,
        Some("guaranteed"),
    );
}

#[test]
fn nested_cgroups_inside_a_container_keep_its_identity() {
    expect(
        &format!("/kubepods/burstable/pod{UID}/{CID}/init.scope"),
        UID,
        Some(CID),
        Some("burstable"),
    );
}

#[test]
fn host_processes_have_no_pod() {
    for path in [
        "/",
        "/system.slice/containerd.service",
        "/user.slice/user-1000.slice/session-3.scope",
        "/system.slice/podman-1234.scope",
        "/kubepods.slice",
        "/kubepods.slice/kubepods-burstable.slice",
        "/kubepods/burstable",
        &format!("/system.slice/docker-{CID}.scope"),
    ] {
        assert_eq!(kubelet().parse(path).unwrap(), None, "{path}");
    }
}

#[test]
fn malformed_pod_segments_are_errors() {
    let short = bad("/kubepods/burstable/pod2c48913c-b29f-11e7-9350/x");
    assert!(short.contains("not 36 characters"), "{short}");
    // Right length, a non-hex character: it sits where kubelet puts pods.
    let wrong_char = bad("/kubepods/burstable/pod2c48913c-b29f-11e7-9350-02096814779z");
    assert!(wrong_char.contains("8-4-4-4-12"), "{wrong_char}");
    // Mixed separators.
    bad("/kubepods/pod2c48913c_b29f-11e7-9350-020968147796");
    // Dashes grouped wrong.
    bad("/kubepods/pod2c48913cb-29f-11e7-9350-020968147796");
    bad("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1234.slice");
    // Outside the kubelet's roots, even a malformed pod segment is refused.
    outside("/dbgw-test-1/pod12ab");
}

#[test]
fn malformed_container_segments_are_errors() {
    let pod_slice = format!("/kubepods.slice/kubepods-pod{UID_}.slice");
    let short = bad(&format!("{pod_slice}/cri-containerd-abc123.scope"));
    assert!(short.contains("64 lower-case hex"), "{short}");
    bad(&format!(
        "{pod_slice}/docker-{}.scope",
        CID.to_ascii_uppercase()
    ));
    bad(&format!("{pod_slice}/crio-conmon-xyz.scope"));
    // Directly under a pod, only containers are expected.
    let odd = bad(&format!("/kubepods/pod{UID}/not-a-container"));
    assert!(odd.contains("directly under pod"), "{odd}");
}

#[test]
fn two_pods_or_two_containers_conflict() {
    let two_pods = conflict(&format!(
        "/kubepods/pod{OTHER_UID}/{OTHER_CID}/kubepods/pod{UID}/{CID}"
    ));
    assert!(two_pods.contains("two pod segments"), "{two_pods}");
    let two_containers = conflict(&format!("/kubepods/pod{UID}/{CID}/{OTHER_CID}"));
    assert!(
        two_containers.contains("two container ids"),
        "{two_containers}"
    );
    let mixed_drivers = conflict(&format!(
        "/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{CID}.scope/docker-{OTHER_CID}.scope"
    ));
    assert!(
        mixed_drivers.contains("two container ids"),
        "{mixed_drivers}"
    );
    conflict(&format!(
        "/kubepods/pod{UID}/crio-conmon-{OTHER_CID}.scope/{CID}"
    ));
}

#[test]
fn the_same_pod_twice_is_a_conflict_too() {
    conflict(&format!("/kubepods/pod{UID}/{CID}/pod{UID_}"));
}

/// Issue 18 item 1: a user with a delegated cgroup subtree (`user@UID.service`, rootless
/// containers) builds the victim's kubelet-shaped path; outside the kubelet's roots, or
/// anywhere below them but where the kubelet puts pods, it names no pod.
#[test]
fn hardening_01_delegated_cgroup_cannot_take_pod_identity() {
    let user = "/user.slice/user-1000.slice/user@1000.service";
    let msg = outside(&format!(
        "{user}/app.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope"
    ));
    assert!(
        msg.contains("outside the kubelet's cgroup roots") && msg.contains("/kubepods.slice"),
        "{msg}"
    );
    // The whole kubelet layout rebuilt inside the delegated subtree, either driver.
    outside(&format!(
        "{user}/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope"
    ));
    outside(&format!("{user}/kubepods/burstable/pod{UID}/{CID}"));
    // A rootless container runtime's own cgroups.
    outside(&format!(
        "/system.slice/podman-1234.scope/kubepods-pod{UID_}.slice/crio-{CID}.scope"
    ));
    // Below a root, a pod segment counts only directly under it or its QoS cgroup.
    let deep = bad(&format!(
        "/kubepods.slice/evil.slice/kubepods-pod{UID_}.slice/cri-containerd-{CID}.scope"
    ));
    assert!(deep.contains("not where the kubelet puts pods"), "{deep}");
    bad(&format!(
        "/kubepods.slice/kubepods-burstable.slice/x.slice/kubepods-burstable-pod{UID_}.slice"
    ));
    bad(&format!("/kubepods/burstable/besteffort/pod{UID}/{CID}"));
    // Nested under another pod's container (a delegated container cgroup).
    conflict(&format!(
        "/kubepods.slice/kubepods-pod{}.slice/cri-containerd-{OTHER_CID}.scope/kubepods-pod{UID_}.slice",
        OTHER_UID.replace('-', "_")
    ));
    // The real layouts still resolve.
    expect(
        &format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope"
        ),
        UID,
        Some(CID),
        Some("burstable"),
    );
}

#[test]
fn kubelet_roots_are_checked() {
    for bad_root in [
        "",
        "/",
        "kubepods.slice",
        "/a/../kubepods",
        "/a//b",
        "/./kubepods",
    ] {
        let r = KubeletCgroups::new(&[bad_root.to_owned()]);
        assert!(
            matches!(r, Err(IdentityError::KubeletRoot(_))),
            "{bad_root:?}: {r:?}"
        );
    }
    assert!(matches!(
        KubeletCgroups::new(&[]),
        Err(IdentityError::KubeletRoot(_))
    ));
}
