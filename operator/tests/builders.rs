//! Snapshot tests of every child object, for a minimal and a full ChatCluster, plus the pure
//! validation rules behind them. The snapshots are also validated against the Kubernetes
//! schemas (strict, oldest and newest supported version) by `scripts/lint-chart.sh`: these tests
//! fail unless the built objects equal the snapshots, so together they validate what is built.

use chat_node::config::StorageMode;
use chat_operator::crd::ChatCluster;
use chat_operator::fixtures::{api_keys_secret, full, jwt_secret, minimal, theme_config_map, tls_secret, with_api};
use chat_operator::reconcile::validate::{Plan, Refs, validate};
use chat_operator::resources::{CONFIG_DIR, CONFIG_KEY, CONFIG_PATH, Children, DATA_DIR, Owner, build};

fn refs() -> Refs {
    Refs {
        auth_secret: Some(jwt_secret("chat-jwt", "key")),
        tls_secret: Some(tls_secret("chat-tls")),
        api_secret: None,
        assets_config_map: Some(theme_config_map("chat-theme")),
        peer_secret: None,
        fresh_peer_key: vec![7; 32],
        statefulset: None,
        existing: Default::default(),
    }
}

fn plan(cluster: &ChatCluster) -> Plan {
    validate(cluster, Owner::of(cluster).unwrap(), &refs()).unwrap()
}

fn snapshot_all(prefix: &str, children: &Children) {
    insta::assert_yaml_snapshot!(format!("{prefix}_statefulset"), children.statefulset);
    insta::assert_yaml_snapshot!(format!("{prefix}_client_service"), children.client_service);
    insta::assert_yaml_snapshot!(format!("{prefix}_peer_service"), children.peer_service);
    insta::assert_yaml_snapshot!(format!("{prefix}_config"), children.config);
    insta::assert_yaml_snapshot!(format!("{prefix}_assets"), children.assets);
    insta::assert_yaml_snapshot!(format!("{prefix}_peer_secret"), children.peer_secret);
    insta::assert_yaml_snapshot!(format!("{prefix}_pdb"), children.pdb);
}

#[test]
fn binary_assets_keep_their_bytes_and_text_stays_text() {
    let cluster = full("prod");
    let assets = build(&cluster, &plan(&cluster)).assets;
    let theme = theme_config_map("chat-theme");
    assert_eq!(assets.binary_data, theme.binary_data, "binaryData copied byte for byte");
    let data = assets.data.unwrap();
    assert_eq!(data["style.css"], "body { color: teal }");
    assert_eq!(data["logo.svg"], cluster.spec.assets.files["logo.svg"], "spec.assets.files stay text");
    assert!(!data.contains_key("favicon.ico"));
}

#[test]
fn the_server_api_gets_its_keys_mounted_in_place_and_a_cluster_ip_service() {
    let cluster = with_api("demo");
    let with_keys = Refs {
        api_secret: Some(api_keys_secret("chat-api", "a-key-of-twenty-characters\nsecond-key-0123456789\n")),
        ..refs()
    };
    let plan = validate(&cluster, Owner::of(&cluster).unwrap(), &with_keys).unwrap();
    let children = build(&cluster, &plan);
    insta::assert_yaml_snapshot!("api_service", children.api_service);
    let config: chat_node::config::NodeConfig = toml::from_str(&plan.config_toml).unwrap();
    assert_eq!(config.admin.api_keys_file.unwrap().to_str(), Some("/etc/chatcluster/api/api-keys"));
    let pod = children.statefulset.spec.template.spec.unwrap();
    let volume = pod.volumes.unwrap().into_iter().find(|v| v.name == "api").expect("api volume");
    let secret = volume.secret.unwrap();
    assert_eq!(secret.secret_name.as_deref(), Some("chat-api"));
    assert_eq!(secret.items.unwrap()[0].key, "api-keys", "only the keys");
    let mount = pod.containers[0].volume_mounts.as_ref().unwrap().iter().find(|m| m.name == "api").cloned().unwrap();
    assert!(mount.sub_path.is_none(), "no subPath: a rotated Secret must reach the running node");
    // A key rotation changes no pod: the keys are not in the config hash.
    let rotated = Refs { api_secret: Some(api_keys_secret("chat-api", "an-entirely-new-key-0000000\n")), ..refs() };
    assert_eq!(validate(&cluster, Owner::of(&cluster).unwrap(), &rotated).unwrap().config_hash, plan.config_hash);
    // Without spec.api: no Service, no volume.
    let plain = minimal("demo");
    assert!(build(&plain, &validate(&plain, Owner::of(&plain).unwrap(), &with_keys).unwrap()).api_service.is_none());
}

#[test]
fn spec_rebalance_becomes_the_node_configs_rebalance_and_pods_know_their_revision() {
    let mut cluster = minimal("demo");
    cluster.spec.rebalance.tolerance_percent = 25;
    cluster.spec.rebalance.connections_per_second = 40;
    cluster.spec.rebalance.min_connection_age_seconds = 300;
    cluster.spec.rebalance.cooldown_seconds = 9;
    let tuned = validate(&cluster, Owner::of(&cluster).unwrap(), &refs()).unwrap();
    let config: chat_node::config::NodeConfig = toml::from_str(&tuned.config_toml).unwrap();
    let expected = chat_node::config::RebalanceConfig {
        enabled: true,
        tolerance_percent: 25,
        connections_per_sec: 40,
        min_connection_age_secs: 300,
        cooldown_secs: 9,
    };
    assert_eq!(config.rebalance, expected);
    // Without spec.rebalance the node's own defaults apply.
    let plain = minimal("demo");
    let config: chat_node::config::NodeConfig =
        toml::from_str(&validate(&plain, Owner::of(&plain).unwrap(), &refs()).unwrap().config_toml).unwrap();
    assert_eq!(config.rebalance, chat_node::config::RebalanceConfig::default());
    // Each pod tells its StatefulSet revision, so nodes see a rollout under way.
    let pod = build(&plain, &plan(&plain)).statefulset.spec.template.spec.unwrap();
    let env = pod.containers[0].env.clone().unwrap();
    let revision = env.iter().find(|e| e.name == "CHAT_CLUSTER__REVISION").expect("revision env");
    let field = revision.value_from.as_ref().and_then(|f| f.field_ref.as_ref()).unwrap();
    assert_eq!(field.field_path, "metadata.labels['controller-revision-hash']");
    // Both are the operator's: set in spec.config they are refused.
    let mut inline = minimal("demo");
    inline.spec.config.rebalance.cooldown_secs = 30;
    assert_eq!(reason(&inline, &refs()), "OperatorOwnedField");
    let mut revision = minimal("demo");
    revision.spec.config.cluster.revision = Some("r1".into());
    assert_eq!(reason(&revision, &refs()), "OperatorOwnedField");
}

#[test]
fn minimal_children() {
    let cluster = minimal("demo");
    snapshot_all("minimal", &build(&cluster, &plan(&cluster)));
}

#[test]
fn full_children() {
    let cluster = full("prod");
    snapshot_all("full", &build(&cluster, &plan(&cluster)));
}

#[test]
fn rendered_config_is_a_valid_node_config() {
    let cluster = full("prod");
    let children = build(&cluster, &plan(&cluster));
    let toml_text = &children.config.data.as_ref().unwrap()[CONFIG_KEY];
    let config: chat_node::config::NodeConfig = toml::from_str(toml_text).unwrap();
    config.validate().unwrap();
    assert_eq!(config.listen.to_string(), "0.0.0.0:8080");
    assert_eq!(config.auth.jwt_secret_file.unwrap().to_str(), Some("/etc/chatcluster/auth/key"));
    assert_eq!(config.drain.deadline_secs, 40);
    assert_eq!(config.auth.rooms[0].pattern, "ops-*");
    assert_eq!(config.cluster.dns_name.as_deref(), Some("prod-peers.chat.svc.cluster.local"));
    assert_eq!(config.cluster.secret_file.unwrap().to_str(), Some("/etc/chatcluster/peer/hmac-key"));
    assert_eq!(config.cluster.peer_listen.to_string(), "0.0.0.0:8081");
    assert_eq!(config.cluster.size, 5, "spec.replicas");
    assert_eq!(config.cluster.ordinal, None, "each pod's ordinal comes from its name");
    assert_eq!(
        (config.cluster.storage, config.cluster.data_dir.unwrap().to_str()),
        (StorageMode::Disk, Some(DATA_DIR))
    );
    let grace = children.statefulset.spec.template.spec.unwrap().termination_grace_period_seconds;
    assert_eq!(grace, Some(45), "grace must exceed the drain deadline");

    let memory = minimal("demo");
    let config: chat_node::config::NodeConfig =
        toml::from_str(&build(&memory, &plan(&memory)).config.data.unwrap()[CONFIG_KEY]).unwrap();
    assert_eq!((config.cluster.size, config.cluster.storage, config.cluster.data_dir), (3, StorageMode::Memory, None));
    let mut zero = minimal("zero");
    zero.spec.replicas = 0;
    assert_eq!(plan(&zero).config.cluster.size, 1, "never 0, which the node refuses");
}

#[test]
fn config_is_a_directory_mount_so_running_pods_see_a_new_size() {
    assert_eq!(std::path::Path::new(CONFIG_DIR).join(CONFIG_KEY).to_str(), Some(CONFIG_PATH));
    let cluster = full("prod");
    let pod = build(&cluster, &plan(&cluster)).statefulset.spec.template.spec.unwrap();
    let mounts = pod.containers[0].volume_mounts.clone().unwrap();
    assert!(mounts.iter().all(|m| m.sub_path.is_none()), "a subPath mount never sees ConfigMap updates");
    let config = mounts.iter().find(|m| m.name == "config").unwrap();
    assert_eq!(config.mount_path, CONFIG_DIR);
    assert_eq!(pod.containers[0].args.as_deref(), Some(&["--config".to_owned(), CONFIG_PATH.to_owned()][..]));
}

#[test]
fn pods_spread_over_machines_and_zones_unless_told_otherwise() {
    let cluster = minimal("demo");
    let pod = build(&cluster, &plan(&cluster)).statefulset.spec.template.spec.unwrap();
    let anti = pod.affinity.and_then(|a| a.pod_anti_affinity).unwrap();
    let preferred = anti.preferred_during_scheduling_ignored_during_execution.unwrap();
    assert!(anti.required_during_scheduling_ignored_during_execution.is_none(), "soft: three pods fit two machines");
    assert_eq!(preferred[0].pod_affinity_term.topology_key, "kubernetes.io/hostname");
    let owner = Owner::of(&cluster).unwrap();
    let selects = |s: &Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector>| {
        s.as_ref().and_then(|s| s.match_labels.clone()) == Some(owner.selector_labels())
    };
    assert!(selects(&preferred[0].pod_affinity_term.label_selector));
    let spread = pod.topology_spread_constraints.unwrap();
    assert_eq!(
        (spread[0].topology_key.as_str(), spread[0].when_unsatisfiable.as_str(), spread[0].max_skew),
        ("topology.kubernetes.io/zone", "ScheduleAnyway", 1)
    );
    assert!(selects(&spread[0].label_selector));

    let mut custom = minimal("demo");
    custom.spec.pod.affinity = Some(Default::default());
    custom.spec.pod.topology_spread_constraints =
        vec![k8s_openapi::api::core::v1::TopologySpreadConstraint { max_skew: 2, ..Default::default() }];
    let pod = build(&custom, &plan(&custom)).statefulset.spec.template.spec.unwrap();
    assert_eq!(pod.affinity, Some(Default::default()), "the user's affinity replaces the default");
    assert_eq!(pod.topology_spread_constraints.unwrap()[0].max_skew, 2);
}

#[test]
fn the_pod_security_context_can_be_replaced_for_platforms_that_assign_ids() {
    let cluster = minimal("demo");
    let pod = build(&cluster, &plan(&cluster)).statefulset.spec.template.spec.unwrap();
    assert_eq!(pod.security_context.unwrap().run_as_user, Some(65532));
    let mut openshift = minimal("demo");
    openshift.spec.pod.security_context = Some(Default::default());
    let pod = build(&openshift, &plan(&openshift)).statefulset.spec.template.spec.unwrap();
    assert_eq!(pod.security_context, Some(Default::default()), "no uid, gid or fsGroup forced");
    let container = pod.containers[0].security_context.clone().unwrap();
    assert_eq!((container.run_as_non_root, container.read_only_root_filesystem), (Some(true), Some(true)));
}

#[test]
fn probes_give_a_slow_start_time_and_readiness_a_second_chance() {
    let cluster = minimal("demo");
    let container = build(&cluster, &plan(&cluster)).statefulset.spec.template.spec.unwrap().containers[0].clone();
    let budget = |p: &Option<k8s_openapi::api::core::v1::Probe>| {
        let p = p.clone().unwrap();
        p.period_seconds.unwrap() * p.failure_threshold.unwrap()
    };
    assert!(budget(&container.startup_probe) >= 60, "reading back room logs must not get the pod killed");
    let readiness = container.readiness_probe.clone().unwrap();
    assert!(readiness.failure_threshold.unwrap() > 1, "one slow answer must not take a node out");
    let lb_grace = i32::try_from(cluster.spec.drain.lb_grace_seconds).unwrap();
    assert!(budget(&container.readiness_probe) < lb_grace, "a draining node leaves the Service within its grace");
}

#[test]
fn storage_adds_a_volume_per_node_that_a_scale_down_deletes() {
    let cluster = full("prod");
    let sts = build(&cluster, &plan(&cluster)).statefulset.spec;
    let claims = sts.volume_claim_templates.unwrap();
    assert_eq!(claims.len(), 1);
    let claim = claims[0].spec.clone().unwrap();
    assert_eq!(claim.access_modes.unwrap(), ["ReadWriteOnce"]);
    assert_eq!(claim.storage_class_name.as_deref(), Some("fast-ssd"));
    assert_eq!(claim.resources.unwrap().requests.unwrap()["storage"].0, "2Gi");
    let policy = sts.persistent_volume_claim_retention_policy.unwrap();
    assert_eq!((policy.when_scaled.as_deref(), policy.when_deleted.as_deref()), (Some("Delete"), Some("Retain")));
    let pod = sts.template.spec.unwrap();
    let data = pod.containers[0].volume_mounts.as_ref().unwrap().iter().find(|m| m.name == "data").cloned().unwrap();
    assert_eq!((data.mount_path.as_str(), data.read_only), (DATA_DIR, Some(false)));
    let security = pod.security_context.unwrap();
    assert_eq!((security.fs_group, security.fs_group_change_policy.as_deref()), (Some(65532), Some("OnRootMismatch")));
    assert_eq!(sts.pod_management_policy.as_deref(), Some("Parallel"));

    let memory = minimal("demo");
    let sts = build(&memory, &plan(&memory)).statefulset.spec;
    assert!(sts.volume_claim_templates.is_none() && sts.persistent_volume_claim_retention_policy.is_none());
}

#[test]
fn a_scale_does_not_change_the_hash_but_a_config_change_does() {
    let base = full("prod");
    let mut scaled = base.clone();
    scaled.spec.replicas = 9;
    let (before, after) = (plan(&base), plan(&scaled));
    assert_ne!(before.config_toml, after.config_toml, "the ConfigMap carries the new size");
    assert_eq!(before.config_hash, after.config_hash, "a scale must not roll the pods");
    let mut config = base.clone();
    config.spec.config.cluster.partitions = 16;
    assert_ne!(before.config_hash, plan(&config).config_hash);
}

#[test]
fn assets_do_not_change_the_hash_but_config_does() {
    let base = full("prod");
    let mut assets = base.clone();
    assets.spec.assets.files.insert("extra.css".into(), "p {}".into());
    assert_eq!(plan(&base).config_hash, plan(&assets).config_hash);
    let mut config = base.clone();
    config.spec.config.history.size = 7;
    assert_ne!(plan(&base).config_hash, plan(&config).config_hash);
    let mut key = refs();
    key.auth_secret = Some(jwt_secret("chat-jwt", "key"));
    if let Some(data) = key.auth_secret.as_mut().and_then(|s| s.data.as_mut()) {
        data.insert("key".into(), k8s_openapi::ByteString(b"another-key-of-enough-length".to_vec()));
    }
    let rotated = validate(&base, Owner::of(&base).unwrap(), &key).unwrap();
    assert_ne!(plan(&base).config_hash, rotated.config_hash, "a new JWT key needs a restart");
}

#[test]
fn existing_peer_key_is_kept() {
    let cluster = minimal("demo");
    let first = build(&cluster, &plan(&cluster)).peer_secret;
    let mut again = refs();
    again.peer_secret = Some(first.clone());
    again.fresh_peer_key = vec![9; 32];
    let second = validate(&cluster, Owner::of(&cluster).unwrap(), &again).unwrap();
    assert_eq!(second.peer_key, vec![7; 32]);
}

fn reason(cluster: &ChatCluster, refs: &Refs) -> &'static str {
    validate(cluster, Owner::of(cluster).unwrap(), refs).unwrap_err().reason
}

#[test]
fn invalid_specs_are_named() {
    let mut jwt_without_secret = minimal("a");
    jwt_without_secret.spec.config.auth.mode = chat_node::config::AuthMode::Jwt;
    assert_eq!(reason(&jwt_without_secret, &refs()), "MissingJwtSecret");

    let api = with_api("api");
    assert_eq!(reason(&api, &refs()), "SecretNotFound");
    let wrong_key = Refs { api_secret: Some(jwt_secret("chat-api", "other")), ..refs() };
    assert_eq!(reason(&api, &wrong_key), "SecretKeyNotFound");
    let short = Refs { api_secret: Some(api_keys_secret("chat-api", "good-key-0123456789\nshort\n")), ..refs() };
    assert_eq!(reason(&api, &short), "WeakApiKey");
    let mut inline = minimal("api");
    inline.spec.config.admin.api_keys = vec!["an-inline-key-0123456789".into()];
    assert_eq!(reason(&inline, &refs()), "InlineSecret");
    let mut owned = minimal("api");
    owned.spec.config.admin.api_keys_file = Some("/elsewhere".into());
    assert_eq!(reason(&owned, &refs()), "OperatorOwnedField");

    let missing = Refs { auth_secret: None, ..refs() };
    assert_eq!(reason(&full("b"), &missing), "SecretNotFound");
    let no_cm = Refs { assets_config_map: None, ..refs() };
    assert_eq!(reason(&full("b"), &no_cm), "ConfigMapNotFound");
    let wrong_key = Refs { auth_secret: Some(jwt_secret("chat-jwt", "other")), ..refs() };
    assert_eq!(reason(&full("b"), &wrong_key), "SecretKeyNotFound");

    let mut node_id = minimal("c");
    node_id.spec.config.node_id = Some("x".into());
    assert_eq!(reason(&node_id, &refs()), "OperatorOwnedField");

    let mut grace = minimal("d");
    grace.spec.drain.termination_grace_period_seconds = Some(25);
    assert_eq!(reason(&grace, &refs()), "InvalidDrain");

    let mut bad_asset = minimal("e");
    bad_asset.spec.assets.files.insert("../etc/passwd".into(), String::new());
    assert_eq!(reason(&bad_asset, &refs()), "InvalidAssetName");

    let mut bad_config = minimal("f");
    bad_config.spec.config.limits.idle_timeout_secs = 1;
    let problem = validate(&bad_config, Owner::of(&bad_config).unwrap(), &refs()).unwrap_err();
    assert_eq!(problem.reason, "InvalidConfig");
    assert!(problem.message.contains("limits.idle_timeout_secs"), "{problem}");

    let mut peers = minimal("h");
    peers.spec.config.cluster.static_peers = vec!["10.0.0.1:8081".into()];
    assert_eq!(reason(&peers, &refs()), "OperatorOwnedField");
    let mut cluster_secret = minimal("i");
    cluster_secret.spec.config.cluster.secret = Some("0123456789abcdef".into());
    assert_eq!(reason(&cluster_secret, &refs()), "InlineSecret");

    let mut inline = minimal("g");
    inline.spec.config.auth.jwt_secret = Some("0123456789abcdef".into());
    assert_eq!(reason(&inline, &refs()), "InlineSecret");

    let mut ordinal = minimal("j");
    ordinal.spec.config.cluster.ordinal = Some(1);
    assert_eq!(reason(&ordinal, &refs()), "OperatorOwnedField");
    let mut disk = minimal("k");
    disk.spec.config.cluster.storage = StorageMode::Disk;
    let problem = validate(&disk, Owner::of(&disk).unwrap(), &refs()).unwrap_err();
    assert_eq!(problem.reason, "MissingStorage");
    assert!(problem.message.contains("spec.storage"), "{problem}");
    let mut data_dir = full("l");
    data_dir.spec.config.cluster.data_dir = Some("/data".into());
    assert_eq!(reason(&data_dir, &refs()), "OperatorOwnedField");
}

#[test]
fn names_that_cannot_name_pods_and_services_are_refused() {
    let longest = "a".repeat(chat_operator::crd::MAX_NAME_LEN);
    assert!(validate(&minimal(&longest), Owner::of(&minimal(&longest)).unwrap(), &refs()).is_ok());
    for name in [format!("{longest}b"), "9lives".into(), "chat-".into(), "Chat".into(), "chat.one".into()] {
        let cluster = minimal(&name);
        assert_eq!(reason(&cluster, &refs()), "InvalidName", "{name}");
    }
}

#[test]
fn the_crd_carries_the_same_name_rule_for_admission() {
    let crd = serde_json::to_value(chat_operator::crd::definition()).unwrap();
    let rules = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["x-kubernetes-validations"];
    let rule = rules[0]["rule"].as_str().unwrap_or_default();
    assert!(rule.contains(&format!("size() <= {}", chat_operator::crd::MAX_NAME_LEN)), "{rule}");
    assert!(rule.contains(chat_operator::crd::NAME_PATTERN), "{rule}");
}

#[test]
fn tls_mounts_the_secret_whole_and_points_the_node_at_it() {
    let mut cluster = minimal("secure");
    cluster.spec.tls = Some(chat_operator::crd::TlsSpec { secret_name: "chat-tls".into() });
    let plan = plan(&cluster);
    assert_eq!(
        (plan.config.tls.cert_file.as_deref(), plan.config.tls.key_file.as_deref()),
        (
            Some(std::path::Path::new("/etc/chatcluster/tls/tls.crt")),
            Some(std::path::Path::new("/etc/chatcluster/tls/tls.key"))
        )
    );
    let pod = build(&cluster, &plan).statefulset.spec.template.spec.unwrap();
    let volume = pod.volumes.unwrap().into_iter().find(|v| v.name == "tls").expect("a tls volume");
    let secret = volume.secret.unwrap();
    assert_eq!(secret.secret_name.as_deref(), Some("chat-tls"));
    assert!(secret.items.is_none(), "the whole Secret, so that a renewal reaches the pod");
    let mounts = pod.containers[0].volume_mounts.clone().unwrap();
    let mount = mounts.iter().find(|m| m.name == "tls").expect("mounted");
    assert_eq!(
        (mount.mount_path.as_str(), mount.sub_path.as_deref(), mount.read_only),
        ("/etc/chatcluster/tls", None, Some(true))
    );

    assert_eq!(reason(&cluster, &Refs { tls_secret: None, ..refs() }), "SecretNotFound");
    let mut half = tls_secret("chat-tls");
    half.data.as_mut().unwrap().remove("tls.key");
    assert_eq!(reason(&cluster, &Refs { tls_secret: Some(half), ..refs() }), "SecretKeyNotFound");
    let mut own = minimal("own");
    own.spec.config.tls.cert_file = Some("/mine.pem".into());
    assert_eq!(reason(&own, &refs()), "OperatorOwnedField");
}
