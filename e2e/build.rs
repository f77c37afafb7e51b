//! Tests against a real Kubernetes cluster run when `KUBECONFIG` is set at build time and are
//! reported as ignored (with the reason) otherwise: `cfg(kube_cluster)` decides which.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(kube_cluster)");
    println!("cargo::rerun-if-env-changed=KUBECONFIG");
    if std::env::var_os("KUBECONFIG").is_some_and(|v| !v.is_empty()) {
        println!("cargo::rustc-cfg=kube_cluster");
    }
}
