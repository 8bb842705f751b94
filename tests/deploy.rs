//! What deploys the router: the Kubernetes manifests in `deploy/k8s` validate against the
//! Kubernetes API schemas (kubernetes-validate, from PyPI, strict: an unknown field fails),
//! the cascade file in their ConfigMap loads with the keys their Secret provides, their probes
//! and ports match that file, and the pod's grace outlasts the preStop pause plus the drain.
//! The Dockerfile is multi-stage and runs the router as a non-root user.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::{collections::HashMap, path::Path};

use yaml_serde::Value;

const K8S: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/k8s");

fn manifest(name: &str) -> Value {
    let text = std::fs::read_to_string(Path::new(K8S).join(name)).unwrap();
    yaml_serde::from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn at<'a>(v: &'a Value, path: &[&str]) -> &'a Value {
    path.iter().fold(v, |v, k| match k.parse::<usize>() {
        Ok(i) => &v[i],
        Err(_) => &v[*k],
    })
}

#[test]
fn the_manifests_validate_against_the_kubernetes_schemas() {
    let Some(python) = common::python_with("kubernetes_validate") else {
        return;
    };
    let kustomization = manifest("kustomization.yaml");
    let files: Vec<String> = at(&kustomization, &["resources"])
        .as_sequence()
        .unwrap()
        .iter()
        .map(|f| {
            Path::new(K8S)
                .join(f.as_str().unwrap())
                .display()
                .to_string()
        })
        .collect();
    assert_eq!(
        files.len(),
        6,
        "ConfigMap, Secret, Deployment, Service, HPA, PDB"
    );
    let out = std::process::Command::new(python)
        .args(["-m", "kubernetes_validate", "--strict"])
        .args(&files)
        .output()
        .unwrap();
    let said =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    assert_eq!(said.matches(" passed for resource ").count(), 6, "{said}");
}

#[test]
fn the_configmap_holds_a_cascade_file_the_router_loads_and_the_pod_matches_it() {
    let secret = manifest("secret.yaml");
    let env: HashMap<String, String> = at(&secret, &["stringData"])
        .as_mapping()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.as_str().unwrap().into(), v.as_str().unwrap().into()))
        .collect();
    let text = at(&manifest("configmap.yaml"), &["data", "cascade.yaml"])
        .as_str()
        .unwrap()
        .to_string();
    let config =
        cascade_router::config::parse(&text, "configmap cascade.yaml", &|k| env.get(k).cloned())
            .unwrap_or_else(|e| panic!("{e}"));
    let server = &config.server;
    assert!(
        server.auth.is_some(),
        "open to the pod network: keys required"
    );

    let deployment = manifest("deployment.yaml");
    let pod = at(&deployment, &["spec", "template", "spec"]);
    let container = at(pod, &["containers", "0"]);
    let port_of = |name: &str| {
        at(container, &["ports"])
            .as_sequence()
            .unwrap()
            .iter()
            .find(|p| p["name"].as_str() == Some(name))
            .and_then(|p| p["containerPort"].as_u64())
            .unwrap_or_else(|| panic!("no port {name}"))
    };
    assert_eq!(port_of("grpc"), u64::from(server.listen.port()));
    assert_eq!(
        Some(port_of("http")),
        server.http_listen.map(|a| u64::from(a.port()))
    );
    assert_eq!(
        Some(port_of("metrics")),
        server.metrics_listen.map(|a| u64::from(a.port()))
    );
    for probe in ["readinessProbe", "livenessProbe", "startupProbe"] {
        assert_eq!(
            at(container, &[probe, "grpc", "port"]).as_u64(),
            Some(u64::from(server.listen.port())),
            "{probe}: gRPC health on the router's port"
        );
    }
    let grace = at(pod, &["terminationGracePeriodSeconds"])
        .as_u64()
        .unwrap();
    let pause = at(container, &["lifecycle", "preStop", "sleep", "seconds"])
        .as_u64()
        .unwrap();
    assert!(
        grace > pause + server.shutdown_grace.as_secs(),
        "the pod's grace ({grace} s) outlasts the preStop pause ({pause} s) and the drain ({} s)",
        server.shutdown_grace.as_secs()
    );
    // The Deployment's selector picks its own pods, and the Service and the PDB pick them too.
    let labels = at(&deployment, &["spec", "template", "metadata", "labels"]);
    for (file, path) in [
        ("deployment.yaml", &["spec", "selector", "matchLabels"][..]),
        ("service.yaml", &["spec", "selector"][..]),
        ("pdb.yaml", &["spec", "selector", "matchLabels"][..]),
    ] {
        let selector = at(&manifest(file), path).as_mapping().unwrap().clone();
        for (k, v) in &selector {
            assert_eq!(labels.get(k), Some(v), "{file}: {k:?}");
        }
    }
    // The pod runs as the image's non-root user, and the config is where the image expects it.
    let dockerfile =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Dockerfile")).unwrap();
    let user = dockerfile
        .lines()
        .filter_map(|l| l.strip_prefix("USER "))
        .next_back()
        .unwrap();
    assert_eq!(
        at(pod, &["securityContext", "runAsUser"]).as_u64(),
        user.trim().parse().ok()
    );
    let stages = dockerfile
        .lines()
        .filter(|l| l.starts_with("FROM "))
        .count();
    assert!(stages >= 2, "multi-stage: {stages} stage(s)");
    assert!(dockerfile.contains("/etc/cascade-router/cascade.yaml"));
    assert_eq!(
        at(container, &["volumeMounts", "0", "mountPath"]).as_str(),
        Some("/etc/cascade-router")
    );
}
