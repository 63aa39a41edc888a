//! deploy/ checked by the tools its users use (systemd-analyze, kubernetes-validate with the
//! Kubernetes OpenAPI schemas, hadolint, promtool) and kept consistent with itself and with the
//! daemon (paths, port, user, config keys). The tools come from scripts/tools.sh, which the test
//! command runs; a missing tool fails the test, it never skips it.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;
use serde_yaml::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn tool(name: &str) -> PathBuf {
    let venv = std::env::var("MULTIVAED_TOOLS")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from("/var/tmp/multivaed-tools"))
        .join("py/bin")
        .join(name);
    if venv.exists() {
        return venv;
    }
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.exists())
    });
    found.unwrap_or_else(|| {
        panic!("{name} is not installed: run scripts/tools.sh (scripts/test.sh does)")
    })
}

/// Runs a tool; returns (success, stdout + stderr).
fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn yaml(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn get<'a>(v: &'a Value, path: &str) -> &'a Value {
    let mut cur = v;
    for key in path.split('.') {
        cur = match key.parse::<usize>() {
            Ok(i) => &cur[i],
            Err(_) => &cur[key],
        };
    }
    assert!(!cur.is_null(), "missing {path}");
    cur
}

fn str_at<'a>(v: &'a Value, path: &str) -> &'a str {
    get(v, path)
        .as_str()
        .unwrap_or_else(|| panic!("{path} is not a string"))
}

/// A strategic merge of `patch` over `base`, as kustomize does for the fields used here: maps
/// merge key by key, lists of named maps merge by `name`, anything else is replaced.
fn merge(base: &mut Value, patch: &Value) {
    match (base, patch) {
        (Value::Mapping(b), Value::Mapping(p)) => {
            for (k, pv) in p {
                match b.get_mut(k) {
                    Some(bv) => merge(bv, pv),
                    None => {
                        b.insert(k.clone(), pv.clone());
                    }
                }
            }
        }
        (Value::Sequence(b), Value::Sequence(p))
            if p.iter().all(|v| v.get("name").is_some()) && !p.is_empty() =>
        {
            for pv in p {
                match b.iter_mut().find(|bv| bv.get("name") == pv.get("name")) {
                    Some(bv) => merge(bv, pv),
                    None => b.push(pv.clone()),
                }
            }
        }
        (b, p) => *b = p.clone(),
    }
}

fn gpu_statefulset() -> Value {
    gpu_variant("statefulset.yaml")
}

/// A StatefulSet with the GPU patch merged over it (the fleet's overlay applies it to the
/// trainers by target, whatever the patch's own name).
fn gpu_variant(statefulset: &str) -> Value {
    let k8s = root().join("deploy/k8s");
    let mut sts = yaml(&k8s.join(statefulset));
    let mut patch = yaml(&k8s.join("gpu/statefulset-gpu.yaml"));
    patch["metadata"]["name"] = sts["metadata"]["name"].clone();
    merge(&mut sts, &patch);
    sts
}

#[test]
fn systemd_unit_passes_systemd_analyze_verify() {
    let unit = std::fs::read_to_string(root().join("deploy/systemd/multivaed.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/local/bin/multivaed "));
    // verify checks that the ExecStart binary exists: point it at the one just built
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("multivaed.service");
    std::fs::write(
        &path,
        unit.replace("/usr/local/bin/multivaed", env!("CARGO_BIN_EXE_multivaed")),
    )
    .unwrap();
    let (ok, out) = run(Command::new(tool("systemd-analyze"))
        .arg("verify")
        .arg(&path)
        .env("SYSTEMD_LOG_LEVEL", "warning"));
    // systemd-analyze exits 0 on many problems (an unknown Type= is "ignored"): any output fails
    assert!(
        ok && out.trim().is_empty(),
        "systemd-analyze verify:\n{out}"
    );
    for line in [
        "Type=notify",
        "WatchdogSec=",
        "StateDirectory=multivaed",
        "DynamicUser=yes",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
    ] {
        assert!(unit.contains(line), "the unit lacks {line}");
    }
}

#[test]
fn kubernetes_manifests_validate_against_the_openapi_schemas() {
    let k8s = root().join("deploy/k8s");
    let dir = tempfile::tempdir().unwrap();
    let gpu = dir.path().join("statefulset-gpu-rendered.yaml");
    std::fs::write(&gpu, serde_yaml::to_string(&gpu_statefulset()).unwrap()).unwrap();
    let train_gpu = dir.path().join("train-statefulset-gpu-rendered.yaml");
    std::fs::write(
        &train_gpu,
        serde_yaml::to_string(&gpu_variant("train/statefulset.yaml")).unwrap(),
    )
    .unwrap();
    let files = [
        k8s.join("configmap.yaml"),
        k8s.join("service.yaml"),
        k8s.join("statefulset.yaml"),
        k8s.join("pdb.yaml"),
        k8s.join("serve/statefulset.yaml"),
        k8s.join("serve/service.yaml"),
        k8s.join("serve/pdb.yaml"),
        k8s.join("train/statefulset.yaml"),
        k8s.join("train/service.yaml"),
        k8s.join("train/pdb.yaml"),
        k8s.join("fleet/models-pvc.yaml"),
        k8s.join("fleet/object-store-secret.yaml"),
        k8s.join("fleet/object-store-read-secret.yaml"),
        k8s.join("networkpolicy.yaml"),
        k8s.join("serve/networkpolicy.yaml"),
        k8s.join("train/networkpolicy.yaml"),
        k8s.join("secrets/api-tokens.yaml"),
        k8s.join("secrets/fleet-key.yaml"),
        k8s.join("secrets/kafka.yaml"),
        gpu,
        train_gpu,
    ];
    let (ok, out) = run(Command::new(tool("kubernetes-validate"))
        .arg("--strict")
        .args(&files));
    assert!(ok, "kubernetes-validate:\n{out}");
    for f in &files {
        let name = f.file_name().unwrap().to_string_lossy();
        assert!(
            out.lines()
                .any(|l| l.contains(&*name) && l.contains("passed")),
            "{name} was not validated:\n{out}"
        );
    }
    assert!(!out.contains("WARN") && !out.contains("ERROR"), "{out}");
}

#[test]
fn dockerfile_passes_hadolint() {
    let (ok, out) = run(Command::new(tool("hadolint")).arg(root().join("deploy/Dockerfile")));
    assert!(ok && out.trim().is_empty(), "hadolint:\n{out}");
}

#[test]
fn alert_rules_pass_promtool_check_and_unit_tests() {
    let dir = root().join("deploy/prometheus");
    let (ok, out) = run(Command::new(tool("promtool"))
        .args(["check", "rules", "alerts.yml"])
        .current_dir(&dir));
    assert!(ok, "promtool check rules:\n{out}");
    let (ok, out) = run(Command::new(tool("promtool"))
        .args(["test", "rules", "alerts.test.yml"])
        .current_dir(&dir));
    assert!(ok, "promtool test rules:\n{out}");
    let (ok, out) = run(Command::new(tool("promtool"))
        .args(["check", "config", "prometheus.yml"])
        .current_dir(&dir));
    assert!(ok, "promtool check config:\n{out}");
}

/// The image, the manifests, the config in the ConfigMap and the daemon agree: paths, port,
/// user, probes, config keys, shutdown grace.
#[test]
fn dockerfile_manifests_and_config_agree() {
    let k8s = root().join("deploy/k8s");
    let docker = std::fs::read_to_string(root().join("deploy/Dockerfile")).unwrap();
    let sts = yaml(&k8s.join("statefulset.yaml"));
    let cm = yaml(&k8s.join("configmap.yaml"));
    let svc = yaml(&k8s.join("service.yaml"));

    // the ConfigMap's multivaed.toml is a valid configuration of this daemon
    let toml_text = cm["data"]["multivaed.toml"]
        .as_str()
        .expect("the ConfigMap holds multivaed.toml");
    let tmp = tempfile::tempdir().unwrap();
    let cfg_path = tmp.path().join("multivaed.toml");
    std::fs::write(&cfg_path, toml_text).unwrap();
    let config = multivaed::config::Config::load(Some(&cfg_path))
        .unwrap_or_else(|e| panic!("the ConfigMap's multivaed.toml: {e:#}"));
    let port = config.http.listen.port();
    assert!(
        !config.http.listen.ip().is_loopback(),
        "in a pod the probes need a non-loopback listen address"
    );

    let pod = get(&sts, "spec.template.spec");
    let c = get(pod, "containers.0");
    // port: EXPOSE = containerPort = config = Service
    assert!(
        docker.contains(&format!("EXPOSE {port}\n")),
        "EXPOSE {port}"
    );
    assert!(docker.contains(&format!("MULTIVAED_HTTP__LISTEN=0.0.0.0:{port}")));
    assert_eq!(get(c, "ports.0.containerPort").as_u64(), Some(port as u64));
    assert_eq!(str_at(c, "ports.0.name"), "http");
    assert_eq!(str_at(&svc, "spec.ports.0.targetPort"), "http");
    // config path: CMD = args = ConfigMap mount
    let args: Vec<&str> = get(c, "args")
        .as_sequence()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let cfg_arg = args[args.iter().position(|&a| a == "--config").unwrap() + 1];
    assert!(docker.contains(&format!(
        "CMD [\"run\", \"--config\", \"{cfg_arg}\", \"--log-format\", \"json\"]"
    )));
    assert!(docker.contains(&format!("COPY configs/multivaed.toml {cfg_arg}")));
    let mounts = get(c, "volumeMounts").as_sequence().unwrap();
    let mount = |name: &str| {
        mounts
            .iter()
            .find(|m| m["name"].as_str() == Some(name))
            .and_then(|m| m["mountPath"].as_str())
            .unwrap_or_else(|| panic!("no volume mount {name}"))
            .to_string()
    };
    assert_eq!(
        Path::new(cfg_arg).parent().unwrap(),
        Path::new(&mount("config"))
    );
    assert_eq!(
        str_at(pod, "volumes.0.configMap.name"),
        str_at(&cm, "metadata.name")
    );
    // data: ConfigMap data_dir = volume mount = image VOLUME and env
    let data = mount("data");
    assert_eq!(config.data_dir, PathBuf::from(&data));
    assert!(docker.contains(&format!("VOLUME [\"{data}\"]")));
    assert!(docker.contains(&format!("MULTIVAED_DATA_DIR={data}")));
    assert_eq!(
        str_at(&sts, "spec.volumeClaimTemplates.0.metadata.name"),
        "data"
    );
    // user: image USER = runAsUser, non-root
    let uid = get(pod, "securityContext.runAsUser").as_u64().unwrap();
    assert!(uid != 0);
    assert!(docker.contains(&format!("USER {uid}:{uid}")));
    assert_eq!(
        get(pod, "securityContext.runAsNonRoot").as_bool(),
        Some(true)
    );
    // probes on the daemon's endpoints
    for (probe, path) in [
        ("startupProbe", "/healthz"),
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
    ] {
        assert_eq!(str_at(c, &format!("{probe}.httpGet.path")), path);
        assert_eq!(str_at(c, &format!("{probe}.httpGet.port")), "http");
    }
    // the startup probe allows for the first model load (≥ 5 minutes)
    let startup = get(c, "startupProbe.periodSeconds").as_u64().unwrap()
        * get(c, "startupProbe.failureThreshold").as_u64().unwrap();
    assert!(startup >= 300, "startup probe allows only {startup} s");
    // grace period covers the shutdown path (≤ 10 s under load, tested in tests/e2e.rs) twice over
    let grace = get(pod, "terminationGracePeriodSeconds").as_u64().unwrap();
    assert!(grace >= 30, "terminationGracePeriodSeconds {grace}");
    // resources are set
    for k in [
        "requests.cpu",
        "requests.memory",
        "limits.cpu",
        "limits.memory",
    ] {
        get(c, &format!("resources.{k}"));
    }
    // selectors match the pod labels (StatefulSet, Service, PDB, PodMonitor)
    let labels = get(&sts, "spec.template.metadata.labels");
    for (file, path) in [
        ("statefulset.yaml", "spec.selector.matchLabels"),
        ("service.yaml", "spec.selector"),
        ("pdb.yaml", "spec.selector.matchLabels"),
        ("podmonitor.yaml", "spec.selector.matchLabels"),
    ] {
        let sel = get(&yaml(&k8s.join(file)), path)
            .as_mapping()
            .unwrap()
            .clone();
        for (k, v) in &sel {
            assert_eq!(labels.get(k), Some(v), "{file} selects {k:?}={v:?}");
        }
    }
    assert_eq!(
        str_at(&sts, "spec.serviceName"),
        str_at(&svc, "metadata.name")
    );
    // the PodMonitor (a Prometheus Operator CRD, outside the Kubernetes schemas) scrapes the
    // named port's /metrics
    let pm = yaml(&k8s.join("podmonitor.yaml"));
    assert_eq!(str_at(&pm, "apiVersion"), "monitoring.coreos.com/v1");
    assert_eq!(str_at(&pm, "kind"), "PodMonitor");
    assert_eq!(str_at(&pm, "spec.podMetricsEndpoints.0.port"), "http");
    assert_eq!(str_at(&pm, "spec.podMetricsEndpoints.0.path"), "/metrics");
}

/// kustomize's inputs: the base lists every manifest, the GPU overlay only adds the GPU.
#[test]
fn kustomizations_and_the_gpu_variant_are_consistent() {
    let k8s = root().join("deploy/k8s");
    let kust = yaml(&k8s.join("kustomization.yaml"));
    let listed: Vec<&str> = get(&kust, "resources")
        .as_sequence()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let mut files: Vec<String> = std::fs::read_dir(&k8s)
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            (name.ends_with(".yaml") && name != "kustomization.yaml").then_some(name)
        })
        .collect();
    files.sort();
    let mut sorted = listed.clone();
    sorted.sort();
    assert_eq!(sorted, files, "kustomization.yaml must list every manifest");

    let gpu_kust = yaml(&k8s.join("gpu/kustomization.yaml"));
    assert_eq!(str_at(&gpu_kust, "resources.0"), "../");
    assert_eq!(str_at(&gpu_kust, "patches.0.path"), "statefulset-gpu.yaml");
    let base = yaml(&k8s.join("statefulset.yaml"));
    let gpu = gpu_statefulset();
    let c = get(&gpu, "spec.template.spec.containers.0");
    assert_eq!(c["resources"]["limits"]["nvidia.com/gpu"].as_u64(), Some(1));
    assert!(str_at(c, "image").ends_with("-cuda"));
    let env = get(c, "env").as_sequence().unwrap();
    assert!(env
        .iter()
        .any(|e| e["name"] == "MULTIVAED_DEVICE" && e["value"] == "cuda:0"));
    assert!(
        env.iter().any(|e| e["name"] == "RUST_LOG"),
        "the patch must keep the base's env"
    );
    // nothing but the GPU parts differ
    let strip = |v: &Value| {
        let mut v = v.clone();
        let spec = v["spec"]["template"]["spec"].as_mapping_mut().unwrap();
        spec.remove("nodeSelector");
        spec.remove("tolerations");
        let c = &mut v["spec"]["template"]["spec"]["containers"][0];
        let c = c.as_mapping_mut().unwrap();
        c.remove("image");
        c.remove("env");
        c["resources"]["limits"]
            .as_mapping_mut()
            .unwrap()
            .remove("nvidia.com/gpu");
        v
    };
    assert_eq!(strip(&gpu), strip(&base));
}

/// The fleet: its kustomizations list every manifest, the GPU overlay patches the trainers, and
/// both roles mount the shared models volume where the ConfigMap's object store is.
#[test]
fn the_fleet_manifests_share_the_object_store_and_the_gpu_overlay_targets_the_trainers() {
    let k8s = root().join("deploy/k8s");
    let listed = |kust: &str| -> Vec<String> {
        get(&yaml(&k8s.join(kust)), "resources")
            .as_sequence()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(
        listed("fleet/kustomization.yaml"),
        ["../serve", "../train", "models-pvc.yaml"]
    );
    let mut train: Vec<String> = listed("train/kustomization.yaml");
    train.sort();
    assert_eq!(
        train,
        [
            "networkpolicy.yaml",
            "pdb.yaml",
            "service.yaml",
            "statefulset.yaml"
        ]
    );
    let gpu = yaml(&k8s.join("fleet/gpu/kustomization.yaml"));
    assert_eq!(str_at(&gpu, "resources.0"), "../");
    assert_eq!(
        str_at(&gpu, "patches.0.path"),
        "../../gpu/statefulset-gpu.yaml"
    );
    assert_eq!(str_at(&gpu, "patches.0.target.name"), "multivaed-train");
    let rendered = gpu_variant("train/statefulset.yaml");
    let c = get(&rendered, "spec.template.spec.containers.0");
    assert_eq!(c["resources"]["limits"]["nvidia.com/gpu"].as_u64(), Some(1));
    assert!(get(c, "args")
        .as_sequence()
        .unwrap()
        .iter()
        .any(|a| a.as_str() == Some("train")));

    let cm = yaml(&k8s.join("configmap.yaml"));
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("multivaed.toml");
    std::fs::write(&cfg, cm["data"]["multivaed.toml"].as_str().unwrap()).unwrap();
    let config = multivaed::config::Config::load(Some(&cfg)).unwrap();
    let claim = str_at(&yaml(&k8s.join("fleet/models-pvc.yaml")), "metadata.name").to_string();
    assert_eq!(
        str_at(
            &yaml(&k8s.join("fleet/models-pvc.yaml")),
            "spec.accessModes.0"
        ),
        "ReadWriteMany"
    );
    for (file, role) in [
        ("train/statefulset.yaml", "train"),
        ("serve/statefulset.yaml", "serve"),
    ] {
        let sts = yaml(&k8s.join(file));
        let pod = get(&sts, "spec.template.spec");
        let volume = get(pod, "volumes")
            .as_sequence()
            .unwrap()
            .iter()
            .find(|v| v["name"] == "models")
            .unwrap_or_else(|| panic!("{file}: no models volume"));
        assert_eq!(
            volume["persistentVolumeClaim"]["claimName"].as_str(),
            Some(claim.as_str()),
            "{file}"
        );
        let c = get(pod, "containers.0");
        let mount = get(c, "volumeMounts")
            .as_sequence()
            .unwrap()
            .iter()
            .find(|m| m["name"] == "models")
            .unwrap_or_else(|| panic!("{file}: models not mounted"));
        assert_eq!(
            mount["mountPath"].as_str(),
            Some(config.models.store.as_str()),
            "{file}: mounted where the ConfigMap's models.store is"
        );
        assert!(
            get(c, "args")
                .as_sequence()
                .unwrap()
                .iter()
                .any(|a| a.as_str() == Some(role)),
            "{file} runs --role {role}"
        );
        // the trainers write versions; the serving replicas only read them
        let store_secret = match role {
            "train" => "fleet/object-store-secret.yaml",
            _ => "fleet/object-store-read-secret.yaml",
        };
        assert_eq!(
            str_at(c, "envFrom.0.secretRef.name"),
            str_at(&yaml(&k8s.join(store_secret)), "metadata.name"),
            "{file}"
        );
    }
}

/// The Secret of `name` in the manifest `file` (a multi-document file allowed).
fn secret_named(file: &Path, name: &str) -> Value {
    let text = std::fs::read_to_string(file).unwrap();
    let found = serde_yaml::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).unwrap())
        .find(|v| v["kind"] == "Secret" && v["metadata"]["name"] == name);
    found.unwrap_or_else(|| panic!("{}: no Secret {name}", file.display()))
}

/// Every role: its API tokens and (in the fleet) the control-plane key come from Secrets
/// mounted where the environment points the configuration, its Kafka credentials from a Secret
/// of its own, the configuration it ends with is valid, and a NetworkPolicy in its
/// kustomization admits only the clients, the other replicas (serve) and Prometheus to its port.
#[test]
fn every_role_reads_its_credentials_from_secrets_and_a_network_policy_guards_its_port() {
    let k8s = root().join("deploy/k8s");
    let secrets = k8s.join("secrets");
    let cm = yaml(&k8s.join("configmap.yaml"));
    use multivaed::config::Role;
    for (dir, kind) in [
        ("", Role::All),
        ("serve/", Role::Serve),
        ("train/", Role::Train),
    ] {
        let (role, fleet) = (kind.name(), kind != Role::All);
        let sts = yaml(&k8s.join(format!("{dir}statefulset.yaml")));
        let pod = get(&sts, "spec.template.spec");
        let c = get(pod, "containers.0");
        let env: std::collections::HashMap<String, String> = get(c, "env")
            .as_sequence()
            .unwrap()
            .iter()
            .filter_map(|e| {
                Some((
                    e["name"].as_str()?.to_string(),
                    e["value"].as_str()?.to_string(),
                ))
            })
            .collect();
        let mounted = |volume: &str, file: &str| -> String {
            let mount = get(c, "volumeMounts")
                .as_sequence()
                .unwrap()
                .iter()
                .find(|m| m["name"] == volume)
                .unwrap_or_else(|| panic!("{role}: {volume} not mounted"));
            assert_eq!(mount["readOnly"].as_bool(), Some(true), "{role}: {volume}");
            format!("{}/{file}", mount["mountPath"].as_str().unwrap())
        };
        let secret_of = |volume: &str| -> String {
            get(pod, "volumes")
                .as_sequence()
                .unwrap()
                .iter()
                .find(|v| v["name"] == volume)
                .and_then(|v| v["secret"]["secretName"].as_str())
                .unwrap_or_else(|| panic!("{role}: volume {volume} is not a Secret"))
                .to_string()
        };
        // the API's tokens
        let tokens = secret_named(&secrets.join("api-tokens.yaml"), &secret_of("api-tokens"));
        assert!(tokens["stringData"]["tokens"].is_string());
        assert_eq!(
            env.get("MULTIVAED_HTTP__TOKEN_FILE"),
            Some(&mounted("api-tokens", "tokens")),
            "{role}"
        );
        // the fleet's key
        if fleet {
            let key = secret_named(&secrets.join("fleet-key.yaml"), &secret_of("fleet-key"));
            assert!(key["stringData"]["signing-key"].is_string());
            assert_eq!(
                env.get("MULTIVAED_MODELS__SIGNING_KEY_FILE"),
                Some(&mounted("fleet-key", "signing-key")),
                "{role}"
            );
        }
        // Kafka credentials: a Secret of the role's own, its keys librdkafka properties
        let kafka_ref = get(c, "envFrom")
            .as_sequence()
            .unwrap()
            .iter()
            .filter_map(|r| r["secretRef"]["name"].as_str())
            .find(|n| n.starts_with("multivaed-kafka"))
            .unwrap_or_else(|| panic!("{role}: no Kafka credentials Secret"))
            .to_string();
        let kafka = secret_named(&secrets.join("kafka.yaml"), &kafka_ref);
        for key in [
            "MULTIVAED_KAFKA__PROPERTIES__SASL_USERNAME",
            "MULTIVAED_KAFKA__PROPERTIES__SASL_PASSWORD",
        ] {
            assert!(kafka["stringData"][key].is_string(), "{kafka_ref}: {key}");
        }
        // the ConfigMap with the pod's environment is a valid configuration of the role
        let tmp = tempfile::tempdir().unwrap();
        let cfg = tmp.path().join("multivaed.toml");
        std::fs::write(&cfg, cm["data"]["multivaed.toml"].as_str().unwrap()).unwrap();
        let mut config = multivaed::config::Config::load(Some(&cfg)).unwrap();
        config.role = kind;
        config.kafka.instance_id = "multivaed-serve-0".into();
        config.http.token_file = env["MULTIVAED_HTTP__TOKEN_FILE"].clone().into();
        if let Some(k) = env.get("MULTIVAED_MODELS__SIGNING_KEY_FILE") {
            config.models.signing_key_file = k.into();
        }
        config
            .validate()
            .unwrap_or_else(|e| panic!("{role}: {e:#}"));
        assert_eq!(config.http.auth, multivaed::config::HttpAuth::Token);

        // the network policy: the role's pods, its http port, only the expected peers
        let policy = yaml(&k8s.join(format!("{dir}networkpolicy.yaml")));
        let kust = yaml(&k8s.join(format!("{dir}kustomization.yaml")));
        assert!(
            get(&kust, "resources")
                .as_sequence()
                .unwrap()
                .iter()
                .any(|r| r == "networkpolicy.yaml"),
            "{role}: the kustomization applies the policy"
        );
        assert_eq!(
            get(&policy, "spec.podSelector.matchLabels"),
            get(&sts, "spec.selector.matchLabels"),
            "{role}: the policy selects the role's pods"
        );
        assert_eq!(str_at(&policy, "spec.policyTypes.0"), "Ingress");
        let rules = get(&policy, "spec.ingress").as_sequence().unwrap();
        assert_eq!(rules.len(), 1, "{role}");
        assert_eq!(str_at(&rules[0], "ports.0.port"), "http");
        let peers: Vec<String> = get(&rules[0], "from")
            .as_sequence()
            .unwrap()
            .iter()
            .map(|p| serde_yaml::to_string(p).unwrap())
            .collect();
        let client = peers.iter().any(|p| p.contains("multivaed.io/client"));
        let prometheus = peers
            .iter()
            .any(|p| p.contains("prometheus") && p.contains("namespaceSelector"));
        let replicas = peers
            .iter()
            .any(|p| p.contains("multivaed-serve") && !p.contains("namespaceSelector"));
        assert!(prometheus, "{role}: Prometheus reaches /metrics");
        assert_eq!(client, role != "train", "{role}: the API's clients");
        assert_eq!(replicas, role == "serve", "{role}: the other replicas");
        assert_eq!(
            peers.len(),
            1 + usize::from(client) + usize::from(replicas),
            "{role}: {peers:?}"
        );
    }
}
