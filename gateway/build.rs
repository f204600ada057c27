//! Compiles the kernel programs in `gateway-ebpf/` with clang into `OUT_DIR`:
//!
//! - `intercept.bpf.o`: the eBPF object, embedded by `gateway::ebpf` with
//!   `aya::include_bytes_aligned!`;
//! - `maps_layout.txt`: sizes and field offsets of the structs in `maps.h`, printed by
//!   `layout.c` built for the host, which the layout tests in `gateway::ebpf::maps` compare
//!   against the `#[repr(C)]` mirrors.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

/// The Debian packages that provide what this script runs (`cargo xtask setup` installs them).
const PACKAGES: &str = "clang llvm libbpf-dev";

fn main() {
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let src = manifest.join("../gateway-ebpf");
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    for file in ["maps.h", "intercept.bpf.c", "layout.c"] {
        println!("cargo::rerun-if-changed={}", src.join(file).display());
    }
    println!("cargo::rerun-if-env-changed=CLANG");
    let clang = env::var("CLANG").unwrap_or_else(|_| "clang".to_owned());

    match Command::new(&clang).arg("--version").output() {
        Ok(o) if o.status.success() => {}
        Ok(o) => fail(&format!(
            "`{clang} --version` failed ({}): {}",
            o.status,
            String::from_utf8_lossy(&o.stderr)
        )),
        Err(e) => fail(&format!(
            "cannot run `{clang}` ({e}): the eBPF programs are compiled with clang; \
             install the Debian packages `{PACKAGES}` (`cargo xtask setup` does), \
             or point CLANG at a clang binary"
        )),
    }

    // The kernel headers' <asm/...> live in the multiarch directory on Debian; `-target bpf`
    // does not search it by itself.
    let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let multiarch = format!("/usr/include/{arch}-linux-gnu");

    let object = out.join("intercept.bpf.o");
    run(
        Command::new(&clang)
            .args(["-target", "bpf", "-O2", "-g", "-Wall", "-Werror"])
            .arg(format!("-I{multiarch}"))
            .arg("-c")
            .arg(src.join("intercept.bpf.c"))
            .arg("-o")
            .arg(&object),
        "compile gateway-ebpf/intercept.bpf.c",
    );

    let layout = out.join("maps_layout");
    run(
        Command::new(&clang)
            .args(["-O1", "-Wall", "-Werror"])
            .arg(src.join("layout.c"))
            .arg("-o")
            .arg(&layout),
        "compile gateway-ebpf/layout.c",
    );
    let printed = Command::new(&layout)
        .output()
        .unwrap_or_else(|e| fail(&format!("cannot run {}: {e}", layout.display())));
    if !printed.status.success() {
        fail(&format!("{} failed: {}", layout.display(), printed.status));
    }
    write(&out.join("maps_layout.txt"), &printed.stdout);
}

fn run(cmd: &mut Command, what: &str) {
    let output = cmd
        .output()
        .unwrap_or_else(|e| fail(&format!("failed to {what}: cannot run {cmd:?}: {e}")));
    if !output.status.success() {
        fail(&format!(
            "failed to {what} ({}):\n{}\n(needs the Debian packages `{PACKAGES}`)",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ));
    }
}

fn write(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes)
        .unwrap_or_else(|e| fail(&format!("cannot write {}: {e}", path.display())));
}

fn fail(message: &str) -> ! {
    panic!("{message}");
}
