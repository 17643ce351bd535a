//! What ships in `deploy/` holds together: every manifest parses, the WasmPlugin's
//! `pluginConfig` is a configuration the filter accepts, the names and ports the filter
//! calls are the ones the Services and the Deployment define, the kustomizations list every
//! file, the NetworkPolicies and Istio's policies admit each of the controller's ports from
//! its callers only, the check token goes from Secrets to the controller and to the proxies
//! under one name, and the OCI image `make oci` builds holds the tested `.wasm` under the
//! digest the WasmPlugin pins. No cluster: the files are read as a cluster would read them.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;
use serde_json::Value;
use sha2::{Digest, Sha256};
use sluice_controller::config::ConfigSource;
use sluice_controller::settings::{Flags, Mode, Settings};
use sluice_e2e::envoy::wasm_file;
use sluice_e2e::repo_root;
use sluice_filter::config::{ConfigError, FilterConfig, Secret};

fn deploy() -> PathBuf {
    repo_root().join("deploy")
}

fn kubernetes() -> PathBuf {
    deploy().join("kubernetes")
}

fn istio() -> PathBuf {
    deploy().join("istio")
}

fn wasm_plugin_file() -> PathBuf {
    istio().join("wasmplugin.yaml")
}

/// The same filter in Istio's ingress gateway, applied on its own.
fn gateway_wasm_plugin_file() -> PathBuf {
    istio().join("gateway/wasmplugin.yaml")
}

/// Every `.yaml`/`.yml` file under `dir`, sorted.
fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path
                .extension()
                .is_some_and(|ext| ext == "yaml" || ext == "yml")
            {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// The documents of a YAML file (`---` separated), as JSON: what `kubectl` sends the API
/// server. Integers stay integers, as in that conversion.
fn documents(path: &Path) -> Vec<Value> {
    yaml_documents(&read_text(path), &path.display().to_string())
}

/// The documents of YAML `text` (from `origin`, for messages), as JSON.
fn yaml_documents(text: &str, origin: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(text)
        .enumerate()
        .map(|(index, document)| {
            let yaml = serde_yaml_ng::Value::deserialize(document)
                .unwrap_or_else(|e| panic!("{origin} document {index}: {e}"));
            serde_json::to_value(&yaml)
                .unwrap_or_else(|e| panic!("{origin} document {index} is not JSON-shaped: {e}"))
        })
        .collect()
}

/// The ```` ```yaml ```` blocks of a Markdown file (indented ones too, inside list items),
/// each parsed as one document: what a reader copies out of a README.
fn readme_yaml_blocks(path: &Path) -> Vec<Value> {
    let markdown = read_text(path);
    let mut blocks = Vec::new();
    let mut lines = markdown.lines();
    while let Some(line) = lines.next() {
        if line.trim_start() != "```yaml" {
            continue;
        }
        let indent = line.len() - line.trim_start().len();
        let mut block = String::new();
        for line in lines.by_ref() {
            if line.trim_start() == "```" {
                break;
            }
            block.push_str(line.get(indent..).unwrap_or_else(|| line.trim_start()));
            block.push('\n');
        }
        let origin = format!("a yaml block of {}", path.display());
        let mut documents = yaml_documents(&block, &origin);
        assert_eq!(documents.len(), 1, "{origin} holds one document");
        blocks.push(documents.remove(0));
    }
    blocks
}

/// A file's text.
fn read_text(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The one document of `path`.
fn document(path: &Path) -> Value {
    let mut documents = documents(path);
    assert_eq!(documents.len(), 1, "{} holds one document", path.display());
    documents.remove(0)
}

fn text<'a>(value: &'a Value, pointer: &str) -> &'a str {
    value
        .pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("no string at {pointer} in {value}"))
}

fn number(value: &Value, pointer: &str) -> u64 {
    value
        .pointer(pointer)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("no whole number at {pointer} in {value}"))
}

fn list<'a>(value: &'a Value, pointer: &str) -> &'a Vec<Value> {
    value
        .pointer(pointer)
        .and_then(Value::as_array)
        .unwrap_or_else(|| panic!("no list at {pointer} in {value}"))
}

/// The resource of `kind` named `name` among the documents of `path`.
fn resource(path: &Path, kind: &str, name: &str) -> Value {
    let mut found: Vec<Value> = documents(path)
        .into_iter()
        .filter(|doc| doc["kind"] == kind && doc["metadata"]["name"] == name)
        .collect();
    assert_eq!(found.len(), 1, "one {kind} {name} in {}", path.display());
    found.remove(0)
}

fn kustomization() -> Value {
    document(&kubernetes().join("kustomization.yaml"))
}

fn deployment() -> Value {
    resource(
        &kubernetes().join("deployment.yaml"),
        "Deployment",
        "sluice-controller",
    )
}

fn service(name: &str) -> Value {
    resource(&kubernetes().join("services.yaml"), "Service", name)
}

fn wasm_plugin() -> Value {
    wasm_plugin_at(&wasm_plugin_file())
}

fn wasm_plugin_at(path: &Path) -> Value {
    let plugin = document(path);
    assert_eq!(plugin["apiVersion"], "extensions.istio.io/v1alpha1");
    assert_eq!(plugin["kind"], "WasmPlugin");
    plugin
}

/// The WasmPlugin's `pluginConfig` as Istio hands it to the filter: JSON text.
fn plugin_config_json() -> Value {
    wasm_plugin()["spec"]["pluginConfig"].clone()
}

/// What the `istio-proxy` container of a patched pod holds in the check token's variable
/// (deploy/istio/README.md): a stand-in for the Secret's value.
const PROXY_TOKEN: &str = "stand-in-check-token-0123456789";

/// The filter's VM environment as Istio builds it from the WasmPlugin's `vmConfig.env`:
/// `HOST` entries take the proxy's variable of that name from `proxy` (absent there, absent
/// here: Istio skips it), `INLINE` ones (the default) their `value`.
fn vm_environment(proxy: &BTreeMap<&str, &str>) -> BTreeMap<String, String> {
    let mut vm = BTreeMap::new();
    for entry in wasm_plugin()["spec"]["vmConfig"]["env"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let name = text(entry, "/name");
        let value = match entry["valueFrom"].as_str().unwrap_or("INLINE") {
            "HOST" => proxy.get(name).map(|value| (*value).to_owned()),
            "INLINE" => Some(entry["value"].as_str().unwrap_or_default().to_owned()),
            other => panic!("vmConfig.env: no valueFrom {other}"),
        };
        if let Some(value) = value {
            vm.insert(name.to_owned(), value);
        }
    }
    vm
}

/// The filter's own parser on `json`, in the VM of a proxy patched as the README says (its
/// `istio-proxy` container holds the check token in the variable of the patch).
fn parse_in_patched_proxy(json: &str) -> Result<FilterConfig, ConfigError> {
    let (variable, _) = proxy_token_variable();
    let vm = vm_environment(&BTreeMap::from([(variable.as_str(), PROXY_TOKEN)]));
    FilterConfig::parse_with_env(json.as_bytes(), &|name| vm.get(name).cloned())
}

/// The controller's container in the Deployment.
fn controller_container() -> Value {
    let containers = list(&deployment(), "/spec/template/spec/containers").clone();
    assert_eq!(containers.len(), 1, "the pod runs the controller alone");
    containers.into_iter().next().unwrap()
}

/// An environment variable of a container (the controller's, as the Deployment sets it).
fn env<'a>(container: &'a Value, name: &str) -> &'a Value {
    list(container, "/env")
        .iter()
        .find(|var| var["name"] == name)
        .unwrap_or_else(|| panic!("the environment of {} has no {name}", container["name"]))
}

/// The labels of the controller's pods.
fn pod_labels() -> Value {
    deployment()["spec"]["template"]["metadata"]["labels"].clone()
}

/// The container port a Service sends its (only) port to, by name.
fn target_port(service_name: &str) -> String {
    let service = service(service_name);
    let ports = list(&service, "/spec/ports");
    assert_eq!(ports.len(), 1, "{service_name} has one port");
    text(&ports[0], "/targetPort").to_owned()
}

/// The labels the WasmPlugin selects: the pods whose proxies run the filter.
fn proxy_selector() -> Value {
    let selector = wasm_plugin()["spec"]["selector"]["matchLabels"].clone();
    assert!(!selector.as_object().unwrap().is_empty());
    selector
}

/// The keys of a JSON object.
fn keys(value: &Value) -> BTreeSet<&str> {
    value
        .as_object()
        .unwrap_or_else(|| panic!("not a map: {value}"))
        .keys()
        .map(String::as_str)
        .collect()
}

/// A manifest beside the controller's (in `deploy/istio`, naming its namespace itself): it
/// is in the controller's namespace and selects the controller's pods by `pointer`.
fn controller_policy(path: &Path, kind: &str, name: &str, pointer: &str) -> Value {
    let policy = resource(path, kind, name);
    assert_eq!(
        text(&policy, "/metadata/namespace"),
        text(&kustomization(), "/namespace"),
        "{kind} {name} is in the controller's namespace"
    );
    let selector = policy
        .pointer(pointer)
        .unwrap_or_else(|| panic!("{kind} {name} has no {pointer}"));
    assert_eq!(
        keys(selector),
        BTreeSet::from(["matchLabels"]),
        "{selector}"
    );
    assert!(
        selects(&selector["matchLabels"], &pod_labels()),
        "{kind} {name} selects the controller's pods"
    );
    policy
}

/// The port of a `redis://[:password@]host[:port][/db]` URL.
fn redis_port(url: &str) -> u64 {
    let rest = url
        .strip_prefix("redis://")
        .or_else(|| url.strip_prefix("rediss://"))
        .unwrap_or_else(|| panic!("`{url}` is not a redis:// URL"));
    let authority = rest.split('/').next().unwrap();
    let host_port = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    host_port
        .rsplit_once(':')
        .map_or(6379, |(_, port)| port.parse().unwrap())
}

/// The port number of the container port called `name`.
fn container_port(container: &Value, name: &str) -> u64 {
    let port = list(container, "/ports")
        .iter()
        .find(|port| port["name"] == name)
        .unwrap_or_else(|| panic!("the controller has no port named {name}"));
    number(port, "/containerPort")
}

/// The port of `host:port`.
fn port_of(address: &str) -> u64 {
    address
        .rsplit_once(':')
        .and_then(|(_, port)| port.parse().ok())
        .unwrap_or_else(|| panic!("`{address}` is not host:port"))
}

/// `labels` has every pair of `selector`.
fn selects(selector: &Value, labels: &Value) -> bool {
    selector
        .as_object()
        .expect("a selector is a map")
        .iter()
        .all(|(key, value)| labels.get(key) == Some(value))
}

/// The generator of the controller's ConfigMap: (files, literal keys and values).
fn config_map_generator() -> (Vec<String>, Vec<(String, String)>) {
    let generators = list(&kustomization(), "/configMapGenerator").clone();
    let generator = generators
        .iter()
        .find(|generator| generator["name"] == "sluice-controller")
        .expect("kustomization.yaml generates the ConfigMap sluice-controller");
    let files = list(generator, "/files")
        .iter()
        .map(|file| file.as_str().unwrap().to_owned())
        .collect();
    let literals = list(generator, "/literals")
        .iter()
        .map(|literal| {
            let (key, value) = literal.as_str().unwrap().split_once('=').unwrap();
            (key.to_owned(), value.to_owned())
        })
        .collect();
    (files, literals)
}

/// Where the controller reads `key` of its ConfigMap as a file, per the Deployment's mount.
fn mounted_path(key: &str) -> String {
    let pod = deployment()["spec"]["template"]["spec"].clone();
    let volume = list(&pod, "/volumes")
        .iter()
        .find(|volume| volume["configMap"]["name"] == "sluice-controller")
        .expect("a volume of the ConfigMap sluice-controller")
        .clone();
    let item = list(&volume, "/configMap/items")
        .iter()
        .find(|item| item["key"] == key)
        .unwrap_or_else(|| panic!("the ConfigMap volume does not hold {key}"))
        .clone();
    let mount = list(&controller_container(), "/volumeMounts")
        .iter()
        .find(|mount| mount["name"] == volume["name"])
        .expect("the ConfigMap volume is mounted")
        .clone();
    assert_eq!(mount["readOnly"], true);
    format!("{}/{}", text(&mount, "/mountPath"), text(&item, "/path"))
}

#[test]
fn every_yaml_file_under_deploy_parses() {
    let files = yaml_files(&deploy());
    for expected in [
        "kubernetes/kustomization.yaml",
        "kubernetes/deployment.yaml",
        "kubernetes/services.yaml",
        "kubernetes/pdb.yaml",
        "kubernetes/networkpolicy.yaml",
        "istio/kustomization.yaml",
        "istio/wasmplugin.yaml",
        "istio/authorizationpolicy.yaml",
        "istio/peerauthentication.yaml",
        "istio/networkpolicy.yaml",
    ] {
        assert!(
            files.contains(&deploy().join(expected)),
            "deploy/{expected} is missing: {files:?}"
        );
    }
    for file in &files {
        let documents = documents(file);
        assert!(!documents.is_empty(), "{} is empty", file.display());
        for document in &documents {
            assert!(document.is_object(), "{}: {document}", file.display());
        }
    }
    // What the kustomizations apply are Kubernetes objects: each names its API, its kind
    // and itself.
    for dir in [kubernetes(), istio(), istio().join("gateway")] {
        let kustomization = document(&dir.join("kustomization.yaml"));
        assert_eq!(kustomization["kind"], "Kustomization");
        for resource in list(&kustomization, "/resources") {
            let path = dir.join(resource.as_str().unwrap());
            for object in documents(&path) {
                text(&object, "/apiVersion");
                text(&object, "/kind");
                text(&object, "/metadata/name");
            }
        }
    }
    assert_eq!(
        documents(&kubernetes().join("services.yaml")).len(),
        2,
        "services.yaml holds the check and the admin Service"
    );
}

#[test]
fn every_file_beside_a_kustomization_is_listed_in_it() {
    for dir in [kubernetes(), deploy().join("istio")] {
        let kustomization = document(&dir.join("kustomization.yaml"));
        let mut listed = BTreeSet::new();
        for resource in kustomization["resources"].as_array().into_iter().flatten() {
            listed.insert(resource.as_str().unwrap().to_owned());
        }
        for generator in kustomization["configMapGenerator"]
            .as_array()
            .into_iter()
            .flatten()
        {
            for file in generator["files"].as_array().into_iter().flatten() {
                listed.insert(file.as_str().unwrap().to_owned());
            }
        }
        let present: BTreeSet<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().into_string().unwrap())
            .filter(|name| name != "kustomization.yaml" && name != "README.md")
            // A folder with a kustomization of its own is applied on its own (and checked
            // in its turn).
            .filter(|name| !dir.join(name).join("kustomization.yaml").is_file())
            .collect();
        assert_eq!(
            listed,
            present,
            "{}: the kustomization lists exactly the files beside it",
            dir.display()
        );
    }
    // Credentials are never shipped: the admin tokens come from a Secret the user creates.
    for file in yaml_files(&deploy()) {
        for document in documents(&file) {
            assert_ne!(
                document["kind"],
                "Secret",
                "{} ships a Secret",
                file.display()
            );
        }
    }
}

#[test]
fn the_wasm_plugin_config_passes_the_filters_own_parser() {
    let json = serde_json::to_string(&plugin_config_json()).unwrap();
    let config = parse_in_patched_proxy(&json)
        .unwrap_or_else(|e| panic!("the WasmPlugin's pluginConfig is refused: {e}\n{json}"));
    assert_eq!(
        config.controller_credential.as_ref().map(Secret::expose),
        Some(format!("Bearer {PROXY_TOKEN}").as_str()),
        "the filter presents the token of its proxy's variable"
    );
    assert_eq!(
        config.controller_cluster,
        "outbound|8081||sluice-controller.sluice.svc.cluster.local"
    );
    assert_eq!(
        config.controller_authority,
        "sluice-controller.sluice.svc.cluster.local"
    );
    assert_eq!(config.timeout, std::time::Duration::from_millis(200));
    let jwt = config.identity.jwt.as_ref().expect("identity.jwt");
    assert!(
        jwt.verifier.is_none(),
        "the claims come from Istio's jwt_authn, verified natively"
    );
    let metadata = jwt.metadata.as_ref().expect("identity.jwt.from_metadata");
    assert_eq!(
        (metadata.filter.as_str(), metadata.key.as_str()),
        ("envoy.filters.http.jwt_authn", "payload"),
        "where Istio's RequestAuthentication leaves the verified payload"
    );
    // The sidecar's inbound connection manager does not append to X-Forwarded-For.
    assert!(!config.identity.ip.envoy_appends);
}

/// Every whole number of a JSON value written as a float (`200` → `200.0`).
fn with_floats(value: &Value) -> Value {
    match value {
        Value::Number(n) => n
            .as_f64()
            .and_then(serde_json::Number::from_f64)
            .map_or_else(|| value.clone(), Value::Number),
        Value::Array(items) => Value::Array(items.iter().map(with_floats).collect()),
        Value::Object(fields) => Value::Object(
            fields
                .iter()
                .map(|(key, value)| (key.clone(), with_floats(value)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// Istio keeps `pluginConfig` as a `google.protobuf.Struct`, whose numbers are doubles, and
/// writes it out with protojson, which prints a whole double without a fraction (`200`):
/// what the test above parses. A tool that writes `200.0` instead must work too.
#[test]
fn the_wasm_plugin_config_passes_with_its_numbers_as_floats() {
    let floats = with_floats(&plugin_config_json());
    let json = serde_json::to_string(&floats).unwrap();
    assert!(json.contains("\"timeout_ms\":200.0"), "{json}");
    let config = parse_in_patched_proxy(&json)
        .unwrap_or_else(|e| panic!("refused with floats: {e}\n{json}"));
    assert_eq!(config.timeout, std::time::Duration::from_millis(200));
    assert_eq!(config.config_poll, Some(std::time::Duration::from_secs(1)));
}

#[test]
fn a_bad_plugin_config_is_refused_naming_the_field() {
    let good = plugin_config_json();
    // (the field named, where the bad value goes, the value)
    let cases = [
        (
            "controller.timeout_ms",
            ["controller", "timeout_ms"].as_slice(),
            serde_json::json!(0),
        ),
        // Not a whole number: refused, whatever becomes of `200.0`.
        (
            "controller.timeout_ms",
            &["controller", "timeout_ms"],
            serde_json::json!(200.5),
        ),
        ("failur_mode", &["failur_mode"], serde_json::json!("deny")),
        (
            "identity.order[1]",
            &["identity", "order"],
            serde_json::json!(["jwt", "fingerprint"]),
        ),
    ];
    for (field, path, bad) in cases {
        let mut config = good.clone();
        *path.iter().fold(&mut config, |value, key| &mut value[*key]) = bad;
        let json = serde_json::to_string(&config).unwrap();
        let error = parse_in_patched_proxy(&json)
            .err()
            .unwrap_or_else(|| panic!("accepted: {json}"));
        assert_eq!(error.field, field, "{error}");
    }
}

/// The filter calls the controller through the sidecar's cluster of the check Service:
/// `outbound|<Service port>||<Service>.<namespace>.svc.cluster.local`. Rename the Service,
/// move the namespace or change the port without the WasmPlugin, and this fails.
#[test]
fn the_callout_cluster_and_authority_name_the_check_service() {
    let config = plugin_config_json();
    let cluster = text(&config, "/controller/cluster");
    let parts: Vec<&str> = cluster.split('|').collect();
    let [direction, port, subset, host] = parts[..] else {
        panic!("`{cluster}` is not outbound|PORT||HOST");
    };
    assert_eq!((direction, subset), ("outbound", ""), "{cluster}");
    let (service_name, namespace) = host
        .strip_suffix(".svc.cluster.local")
        .and_then(|name| name.split_once('.'))
        .unwrap_or_else(|| panic!("`{host}` is not <service>.<namespace>.svc.cluster.local"));
    assert_eq!(
        namespace,
        text(&kustomization(), "/namespace"),
        "the cluster names the namespace deploy/kubernetes goes into"
    );
    assert_eq!(
        text(&config, "/controller/authority"),
        host,
        "the authority is the Service's host name"
    );

    let check = service(service_name);
    let ports = list(&check, "/spec/ports");
    assert_eq!(
        ports.len(),
        1,
        "the check Service serves the check API only"
    );
    let service_port = &ports[0];
    assert_eq!(
        number(service_port, "/port").to_string(),
        port,
        "the cluster names the Service's port"
    );
    assert_eq!(text(service_port, "/appProtocol"), "http");
    assert!(text(service_port, "/name").starts_with("http"));
    // The Service sends that port to the controller's check API.
    let container = controller_container();
    assert_eq!(text(service_port, "/targetPort"), "check");
    assert_eq!(
        port_of(text(env(&container, "SLUICE_LISTEN"), "/value")),
        container_port(&container, "check"),
        "the controller listens for checks on its `check` port"
    );
    assert!(selects(
        &check["spec"]["selector"],
        &deployment()["spec"]["template"]["metadata"]["labels"]
    ));
}

/// The outlier detection of the shipped Envoy configs, on the sidecars' cluster of the very
/// host the filter calls.
#[test]
fn the_destination_rule_ejects_dead_controllers_of_the_called_host() {
    let rule = resource(
        &deploy().join("istio/destinationrule.yaml"),
        "DestinationRule",
        "sluice-controller",
    );
    assert_eq!(rule["apiVersion"], "networking.istio.io/v1");
    assert_eq!(
        text(&rule, "/spec/host"),
        text(&plugin_config_json(), "/controller/authority"),
        "the host the WasmPlugin calls"
    );
    assert_eq!(
        text(&rule, "/metadata/namespace"),
        text(&wasm_plugin(), "/metadata/namespace"),
        "beside the WasmPlugin, in the mesh's root namespace"
    );
    let outliers = &rule["spec"]["trafficPolicy"]["outlierDetection"];
    assert_eq!(outliers["consecutiveLocalOriginFailures"], 1, "{outliers}");
    assert_eq!(
        outliers["splitExternalLocalOriginErrors"], true,
        "{outliers}"
    );
    assert_eq!(outliers["interval"], "1s", "{outliers}");
}

#[test]
fn the_deployment_probes_and_ports_agree_with_the_services() {
    let deployment = deployment();
    let container = controller_container();
    let pod_labels = &deployment["spec"]["template"]["metadata"]["labels"];
    assert_eq!(number(&deployment, "/spec/replicas"), 2);
    assert!(selects(
        &deployment["spec"]["selector"]["matchLabels"],
        pod_labels
    ));

    // Readiness on /readyz (Redis answers, configuration read), liveness on /healthz (the
    // process runs), both on the check port, where the proxies' traffic comes in.
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        let get = &container[probe]["httpGet"];
        assert_eq!(text(get, "/path"), path, "{probe}");
        assert_eq!(text(get, "/port"), "check", "{probe}");
    }
    assert_eq!(
        port_of(text(env(&container, "SLUICE_ADMIN_LISTEN"), "/value")),
        container_port(&container, "admin")
    );
    let admin = service("sluice-controller-admin");
    assert_eq!(text(&admin, "/spec/type"), "ClusterIP");
    let ports = list(&admin, "/spec/ports");
    assert_eq!(ports.len(), 1);
    assert_eq!(text(&ports[0], "/targetPort"), "admin");
    assert_eq!(
        number(&ports[0], "/port"),
        container_port(&container, "admin")
    );
    assert!(selects(&admin["spec"]["selector"], pod_labels));

    // The PodDisruptionBudget keeps one of the replicas.
    let pdb = resource(
        &kubernetes().join("pdb.yaml"),
        "PodDisruptionBudget",
        "sluice-controller",
    );
    assert_eq!(number(&pdb, "/spec/minAvailable"), 1);
    assert!(selects(&pdb["spec"]["selector"]["matchLabels"], pod_labels));

    // Non-root (the image's user), read-only root file system, no privileges.
    let dockerfile = std::fs::read_to_string(repo_root().join("Dockerfile")).unwrap();
    let controller_stage = dockerfile
        .split("FROM ")
        .find(|stage| stage.contains("AS controller"))
        .expect("the Dockerfile's controller stage");
    assert!(controller_stage.contains("USER 65532:65532"));
    assert!(controller_stage.contains("EXPOSE 8081 8082"));
    // No configuration is built into the image (the demo's API keys are public): whoever
    // runs it gives one, as the Deployment (a ConfigMap) and docker-compose.yml (the demo
    // file, mounted) do.
    assert!(
        !controller_stage.contains("SLUICE_CONFIG"),
        "{controller_stage}"
    );
    assert!(!controller_stage.contains(".toml"), "{controller_stage}");
    let compose = std::fs::read_to_string(repo_root().join("docker-compose.yml")).unwrap();
    assert!(compose.contains("./controller/demo-rules.toml:/etc/sluice/rules.toml:ro"));
    assert!(compose.contains("SLUICE_CONFIG: /etc/sluice/rules.toml"));
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(number(pod, "/securityContext/runAsUser"), 65532);
    let security = &container["securityContext"];
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(security["capabilities"]["drop"], serde_json::json!(["ALL"]));
    for kind in ["requests", "limits"] {
        for resource in ["cpu", "memory"] {
            text(&container, &format!("/resources/{kind}/{resource}"));
        }
    }

    // The admin tokens from a Secret, the Redis URL from the ConfigMap's literal.
    let tokens = &env(&container, "SLUICE_ADMIN_TOKENS")["valueFrom"]["secretKeyRef"];
    assert_eq!(
        (text(tokens, "/name"), text(tokens, "/key")),
        ("sluice-admin-tokens", "tokens")
    );
    let redis = &env(&container, "SLUICE_REDIS_URL")["valueFrom"]["configMapKeyRef"];
    assert_eq!(text(redis, "/name"), "sluice-controller");
    let (_, literals) = config_map_generator();
    assert!(
        literals.iter().any(|(key, _)| key == text(redis, "/key")),
        "the ConfigMap has the key SLUICE_REDIS_URL is read from"
    );
}

/// The ConfigMap's settings file and starting configuration, where the Deployment points
/// the controller at them, with the Deployment's environment: the controller's own
/// resolver and loader accept them.
#[test]
fn the_controller_accepts_the_shipped_settings_and_configuration() {
    let container = controller_container();
    let (files, literals) = config_map_generator();
    let dir = tempfile::tempdir().unwrap();
    for file in &files {
        std::fs::copy(kubernetes().join(file), dir.path().join(file)).unwrap();
    }
    // The paths the Deployment gives are the ConfigMap's files as mounted.
    let local = |variable: &str| {
        let path = text(env(&container, variable), "/value");
        let key = files
            .iter()
            .find(|file| mounted_path(file) == path)
            .unwrap_or_else(|| panic!("{variable}={path} is not a file of the ConfigMap"));
        dir.path().join(key)
    };
    let settings_file = local("SLUICE_SETTINGS");
    let config_file = local("SLUICE_CONFIG");
    let redis_key = text(
        env(&container, "SLUICE_REDIS_URL"),
        "/valueFrom/configMapKeyRef/key",
    );
    let redis_url = literals
        .iter()
        .find(|(key, _)| key == redis_key)
        .map(|(_, value)| value.clone())
        .unwrap();
    let address = |variable: &str| text(env(&container, variable), "/value").parse().unwrap();
    let flags = Flags {
        settings: Some(settings_file),
        listen: Some(address("SLUICE_LISTEN")),
        admin_listen: Some(address("SLUICE_ADMIN_LISTEN")),
        redis_url: Some(redis_url),
        config: Some(config_file.clone()),
        ..Flags::default()
    };
    let settings = Settings::resolve(flags).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(settings.mode, Mode::Production);
    assert_eq!(settings.config_source, ConfigSource::Store);
    assert!(
        settings.listen.ip().is_unspecified(),
        "reachable from other pods"
    );
    assert!(settings.admin_listen.ip().is_unspecified());
    let document = sluice_controller::config::file::load(&config_file)
        .unwrap_or_else(|e| panic!("the starting configuration is refused: {e}"));
    assert!(!document.rules.is_empty());
}

#[test]
fn the_wasm_plugin_is_placed_and_scoped_as_its_readme_says() {
    let plugin = wasm_plugin();
    let spec = &plugin["spec"];
    let url = text(spec, "/url");
    assert!(url.starts_with("oci://"), "{url}");
    let cargo = std::fs::read_to_string(repo_root().join("Cargo.toml")).unwrap();
    let version = cargo
        .lines()
        .skip_while(|line| *line != "[workspace.package]")
        .find_map(|line| line.strip_prefix("version = \""))
        .and_then(|rest| rest.strip_suffix('"'))
        .expect("the workspace's version");
    assert!(
        url.ends_with(&format!(":{version}")),
        "{url}: the tag `make oci` gives the image is the workspace's version, {version}"
    );
    assert_eq!(text(spec, "/phase"), "STATS");
    assert_eq!(text(spec, "/failStrategy"), "FAIL_RELOAD");
    assert_eq!(text(spec, "/type"), "HTTP");
    assert!(spec["priority"].is_i64());
    assert_eq!(spec["match"], serde_json::json!([{ "mode": "SERVER" }]));
    // Never the controller's own pods: each check call would ask for a check.
    let selector = &spec["selector"]["matchLabels"];
    assert!(!selector.as_object().unwrap().is_empty());
    assert!(!selects(
        selector,
        &deployment()["spec"]["template"]["metadata"]["labels"]
    ));
}

/// Runs `scripts/oci-image.sh` on the tested `.wasm` into a fresh directory, without
/// touching the WasmPlugin: (the layout's directory, the digest it printed).
fn build_image() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(repo_root().join("scripts/oci-image.sh"))
        .arg("--wasm")
        .arg(wasm_file())
        .arg("--out")
        .arg(dir.path().join("oci"))
        .arg("--no-update")
        .output()
        .expect("run scripts/oci-image.sh");
    assert!(
        output.status.success(),
        "scripts/oci-image.sh failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let digest = String::from_utf8(output.stdout).unwrap().trim().to_owned();
    assert!(
        digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_hexdigit()),
        "the script prints the manifest's digest, got {digest:?}"
    );
    (dir, digest)
}

fn sha256_hex(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

/// A blob of the layout, checked against the descriptor that points at it.
fn blob(layout: &Path, descriptor: &Value) -> Vec<u8> {
    let digest = text(descriptor, "/digest");
    let hex = digest
        .strip_prefix("sha256:")
        .unwrap_or_else(|| panic!("{digest} is not a sha256 digest"));
    let bytes = std::fs::read(layout.join("blobs/sha256").join(hex)).unwrap();
    assert_eq!(sha256_hex(&bytes), hex, "the blob is what its name says");
    assert_eq!(
        number(descriptor, "/size"),
        bytes.len() as u64,
        "{descriptor}"
    );
    bytes
}

/// The entries of a tar archive: (name, type flag, mode, content).
fn tar_entries(archive: &[u8]) -> Vec<(String, u8, u32, Vec<u8>)> {
    let field = |header: &[u8], range: std::ops::Range<usize>| {
        let raw = &header[range];
        let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
        String::from_utf8(raw[..end].to_vec()).unwrap()
    };
    let octal = |header: &[u8], range: std::ops::Range<usize>| {
        u64::from_str_radix(field(header, range).trim(), 8).unwrap()
    };
    let mut entries = Vec::new();
    let mut at = 0;
    loop {
        let header = &archive[at..at + 512];
        if header.iter().all(|&b| b == 0) {
            break;
        }
        assert_eq!(&header[257..262], b"ustar", "a ustar header");
        let name = field(header, 0..100);
        let size = usize::try_from(octal(header, 124..136)).unwrap();
        let mode = u32::try_from(octal(header, 100..108)).unwrap();
        let content = archive[at + 512..at + 512 + size].to_vec();
        entries.push((name, header[156], mode, content));
        at += 512 + size.div_ceil(512) * 512;
    }
    entries
}

/// The image is Istio's "compat" Wasm image: one manifest, one `tar+gzip` layer holding
/// `plugin.wasm` alone, byte for byte the `.wasm` the Envoy tests load; every digest in the
/// index and the manifest is the blob's own; and the same `.wasm` gives the same image.
#[test]
fn the_oci_image_holds_exactly_the_tested_wasm() {
    let (dir, digest) = build_image();
    let layout = dir.path().join("oci");
    let oci_layout: Value =
        serde_json::from_slice(&std::fs::read(layout.join("oci-layout")).unwrap()).unwrap();
    assert_eq!(oci_layout["imageLayoutVersion"], "1.0.0");
    let index: Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    assert_eq!(number(&index, "/schemaVersion"), 2);
    let manifests = list(&index, "/manifests");
    assert_eq!(manifests.len(), 1, "one image");
    let descriptor = &manifests[0];
    assert_eq!(
        text(descriptor, "/mediaType"),
        "application/vnd.oci.image.manifest.v1+json"
    );
    assert_eq!(text(descriptor, "/digest"), format!("sha256:{digest}"));

    let manifest: Value = serde_json::from_slice(&blob(&layout, descriptor)).unwrap();
    assert_eq!(number(&manifest, "/schemaVersion"), 2);
    assert_eq!(
        text(&manifest, "/config/mediaType"),
        "application/vnd.oci.image.config.v1+json"
    );
    let config: Value = serde_json::from_slice(&blob(&layout, &manifest["config"])).unwrap();
    let layers = list(&manifest, "/layers");
    assert_eq!(layers.len(), 1, "a single layer");
    assert_eq!(
        text(&layers[0], "/mediaType"),
        "application/vnd.oci.image.layer.v1.tar+gzip",
        "the layer type Istio's compat format reads"
    );
    let compressed = blob(&layout, &layers[0]);

    let mut gunzip = Command::new("gzip")
        .args(["--decompress", "--stdout"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("gzip");
    let mut stdin = gunzip.stdin.take().unwrap();
    let feeder = std::thread::spawn(move || std::io::Write::write_all(&mut stdin, &compressed));
    let tar = gunzip.wait_with_output().unwrap();
    feeder.join().unwrap().unwrap();
    assert!(tar.status.success(), "the layer is gzip");
    let tar = tar.stdout;
    assert_eq!(
        list(&config, "/rootfs/diff_ids"),
        &vec![Value::from(format!("sha256:{}", sha256_hex(&tar)))],
        "the configuration names the uncompressed layer"
    );

    let entries = tar_entries(&tar);
    assert_eq!(entries.len(), 1, "the layer holds one file");
    let (name, kind, mode, content) = &entries[0];
    assert_eq!(name, "plugin.wasm", "the name Istio looks for");
    assert_eq!(*kind, b'0', "a regular file");
    assert_eq!(*mode, 0o644);
    let wasm = std::fs::read(wasm_file()).unwrap();
    assert!(
        *content == wasm,
        "plugin.wasm is not {} byte for byte",
        wasm_file().display()
    );

    let (_again, digest_again) = build_image();
    assert_eq!(digest, digest_again, "the same .wasm gives the same image");
}

/// For an `oci://` URL Istio compares the WasmPlugin's `sha256` with the digest of the
/// image's manifest (pkg/wasm/imagefetcher.go, istio/istio#37566), not with the .wasm's.
/// `make oci` writes it there; the value checked in is that of the last release build, so
/// the test runs the script on a copy and checks what it writes, not the checked-in value
/// (which changes with every build of the filter, and with the machine that builds it).
#[test]
fn make_oci_pins_the_digest_of_the_image_it_built_in_the_wasm_plugin() {
    let dir = tempfile::tempdir().unwrap();
    // The sidecars' WasmPlugin and the gateway's, as shipped.
    let plugins: Vec<(PathBuf, String)> = [wasm_plugin_file(), gateway_wasm_plugin_file()]
        .iter()
        .enumerate()
        .map(|(n, shipped)| {
            let copy = dir.path().join(format!("wasmplugin-{n}.yaml"));
            let text = std::fs::read_to_string(shipped).unwrap();
            std::fs::write(&copy, &text).unwrap();
            (copy, text)
        })
        .collect();
    let mut command = Command::new(repo_root().join("scripts/oci-image.sh"));
    command
        .arg("--wasm")
        .arg(wasm_file())
        .arg("--out")
        .arg(dir.path().join("oci"));
    for (copy, _) in &plugins {
        command.arg("--plugin").arg(copy);
    }
    let output = command.output().expect("run scripts/oci-image.sh");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let digest = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    let (_image, built) = build_image();
    assert_eq!(digest, built, "the same .wasm, the same image");
    let wasm = std::fs::read(wasm_file()).unwrap();
    assert_ne!(
        digest,
        sha256_hex(&wasm),
        "the image manifest's digest, not the .wasm's"
    );
    // Nothing else in the files changed.
    let others = |text: &str| -> Vec<String> {
        text.lines()
            .filter(|line| !line.trim_start().starts_with("sha256:"))
            .map(str::to_owned)
            .collect()
    };
    for (copy, shipped) in &plugins {
        let written = std::fs::read_to_string(copy).unwrap();
        let pinned: Value = serde_yaml_ng::from_str(&written).unwrap();
        assert_eq!(text(&pinned, "/spec/sha256"), digest, "{}", copy.display());
        assert_eq!(others(&written), others(shipped));
    }
}

/// `deploy/kubernetes/networkpolicy.yaml`: the controller's pods take the check API's port
/// from the pods whose proxies run the filter (the WasmPlugin's label), in any namespace, the
/// admin port from operators' pods of their own namespace, nothing else on any port; they
/// reach the Redis URL's port and DNS, nothing else. Ports are the container's port names,
/// the ones the Services send to.
#[test]
fn the_network_policy_admits_each_controller_port_from_its_callers_only() {
    let policy = resource(
        &kubernetes().join("networkpolicy.yaml"),
        "NetworkPolicy",
        "sluice-controller",
    );
    assert_eq!(policy["apiVersion"], "networking.k8s.io/v1");
    let spec = &policy["spec"];
    assert_eq!(keys(&spec["podSelector"]), BTreeSet::from(["matchLabels"]));
    assert!(
        selects(&spec["podSelector"]["matchLabels"], &pod_labels()),
        "the policy selects the controller's pods"
    );
    let types: BTreeSet<&str> = list(spec, "/policyTypes")
        .iter()
        .map(|kind| kind.as_str().unwrap())
        .collect();
    assert_eq!(types, BTreeSet::from(["Egress", "Ingress"]));

    // Who may reach each port, by the container port's name.
    let container = controller_container();
    let mut admitted: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for rule in list(spec, "/ingress") {
        let from = list(rule, "/from");
        assert!(
            !from.is_empty(),
            "a rule without `from` admits anyone: {rule}"
        );
        let ports = list(rule, "/ports");
        assert!(
            !ports.is_empty(),
            "a rule without `ports` admits every port: {rule}"
        );
        for port in ports {
            assert_eq!(keys(port), BTreeSet::from(["port", "protocol"]), "{port}");
            assert_eq!(text(port, "/protocol"), "TCP");
            // By name (a number here would be a copy that can drift): one the pod has.
            let name = text(port, "/port");
            container_port(&container, name);
            admitted
                .entry(name.to_owned())
                .or_default()
                .extend(from.iter().cloned());
        }
    }
    let names: BTreeSet<String> = list(&container, "/ports")
        .iter()
        .map(|port| text(port, "/name").to_owned())
        .collect();
    assert_eq!(
        admitted.keys().cloned().collect::<BTreeSet<_>>(),
        names,
        "every port of the controller has its callers, and no other port is open"
    );

    // The admin port (the admin Service's target): operators' pods of this namespace, by
    // the label the README documents; a proxy is not an operator.
    let admin = target_port("sluice-controller-admin");
    let [operator] = admitted[&admin].as_slice() else {
        panic!(
            "the admin port takes one kind of caller: {:?}",
            admitted[&admin]
        );
    };
    assert_eq!(
        keys(operator),
        BTreeSet::from(["podSelector"]),
        "operators from the controller's own namespace, by pod label: {operator}"
    );
    assert_eq!(
        keys(&operator["podSelector"]),
        BTreeSet::from(["matchLabels"])
    );
    let operator_labels = &operator["podSelector"]["matchLabels"];
    assert!(!operator_labels.as_object().unwrap().is_empty());
    assert!(!selects(operator_labels, &proxy_selector()));
    let documented = read_text(&kubernetes().join("README.md"));
    for (key, value) in operator_labels.as_object().unwrap() {
        let label = format!("{key}={}", value.as_str().unwrap());
        assert!(
            documented.contains(&label),
            "deploy/kubernetes/README.md tells operators to label their pods {label}"
        );
    }

    // Every other port, the check Service's target among them: the proxies, anywhere.
    let proxies = serde_json::json!({
        "namespaceSelector": {},
        "podSelector": { "matchLabels": proxy_selector() },
    });
    let check = target_port("sluice-controller");
    assert_ne!(check, admin);
    for (port, peers) in &admitted {
        if *port != admin {
            assert_eq!(peers, &vec![proxies.clone()], "who may reach port {port}");
        }
    }
    assert!(admitted.contains_key(&check));

    // Out: the Redis URL's port and DNS, each rule port by port.
    let (_, literals) = config_map_generator();
    let redis_key = text(
        env(&container, "SLUICE_REDIS_URL"),
        "/valueFrom/configMapKeyRef/key",
    );
    let redis_url = &literals.iter().find(|(key, _)| key == redis_key).unwrap().1;
    let mut open = BTreeSet::new();
    for rule in list(spec, "/egress") {
        let ports = list(rule, "/ports");
        assert!(
            !ports.is_empty(),
            "a rule without `ports` lets out every port: {rule}"
        );
        for port in ports {
            assert_eq!(keys(port), BTreeSet::from(["port", "protocol"]), "{port}");
            open.insert((text(port, "/protocol").to_owned(), number(port, "/port")));
        }
    }
    assert_eq!(
        open,
        BTreeSet::from([
            ("TCP".to_owned(), redis_port(redis_url)),
            ("TCP".to_owned(), 53),
            ("UDP".to_owned(), 53),
        ]),
        "the controller reaches Redis ({redis_url}) and DNS only"
    );
}

/// `deploy/istio`: the controller's sidecar takes mTLS only; its AuthorizationPolicy admits
/// the check port from the namespaces of the limited workloads (each of which the README
/// gives the check token) and the admin port from the controller's own namespace, nothing
/// else, by the port numbers the Deployment defines; and the sidecar may reach istiod.
#[test]
fn the_istio_policies_admit_proxies_and_operators_to_the_controller_only() {
    let namespace = text(&kustomization(), "/namespace").to_owned();
    let container = controller_container();

    let peers = controller_policy(
        &istio().join("peerauthentication.yaml"),
        "PeerAuthentication",
        "sluice-controller",
        "/spec/selector",
    );
    assert_eq!(peers["apiVersion"], "security.istio.io/v1");
    assert_eq!(
        peers["spec"],
        serde_json::json!({
            "selector": peers["spec"]["selector"],
            "mtls": { "mode": "STRICT" },
        }),
        "mTLS required on every port, no exception"
    );

    let policy = controller_policy(
        &istio().join("authorizationpolicy.yaml"),
        "AuthorizationPolicy",
        "sluice-controller",
        "/spec/selector",
    );
    assert_eq!(policy["apiVersion"], "security.istio.io/v1");
    assert_eq!(text(&policy, "/spec/action"), "ALLOW");
    let mut admitted: BTreeMap<u64, Vec<Value>> = BTreeMap::new();
    for rule in list(&policy, "/spec/rules") {
        assert_eq!(keys(rule), BTreeSet::from(["from", "to"]), "{rule}");
        let mut sources = Vec::new();
        for from in list(rule, "/from") {
            assert_eq!(keys(from), BTreeSet::from(["source"]), "{from}");
            let source = &from["source"];
            assert!(!source.as_object().unwrap().is_empty(), "{rule}");
            for (field, values) in source.as_object().unwrap() {
                assert!(
                    field == "namespaces" || field == "principals",
                    "a source by mTLS identity only: {source}"
                );
                let values = values.as_array().unwrap();
                assert!(!values.is_empty(), "{source}");
                for value in values {
                    assert!(
                        !value.as_str().unwrap().contains('*'),
                        "no wildcard: {source}"
                    );
                }
            }
            sources.push(source.clone());
        }
        assert!(
            !sources.is_empty(),
            "a rule without `from` admits anyone: {rule}"
        );
        let to = list(rule, "/to");
        assert!(
            !to.is_empty(),
            "a rule without `to` admits every port: {rule}"
        );
        for to in to {
            assert_eq!(keys(to), BTreeSet::from(["operation"]), "{to}");
            assert_eq!(keys(&to["operation"]), BTreeSet::from(["ports"]), "{to}");
            for port in list(to, "/operation/ports") {
                let port: u64 = port.as_str().unwrap().parse().unwrap();
                admitted
                    .entry(port)
                    .or_default()
                    .extend(sources.iter().cloned());
            }
        }
    }
    let numbers: BTreeSet<u64> = list(&container, "/ports")
        .iter()
        .map(|port| number(port, "/containerPort"))
        .collect();
    assert_eq!(
        admitted.keys().copied().collect::<BTreeSet<_>>(),
        numbers,
        "every port of the controller has its callers, and no other port is admitted"
    );
    let admin = container_port(&container, &target_port("sluice-controller-admin"));
    assert_eq!(
        admitted[&admin],
        vec![serde_json::json!({ "namespaces": [namespace] })],
        "the admin port from the controller's own namespace only"
    );
    let check = container_port(&container, &target_port("sluice-controller"));
    let (proxy_secret, _) = proxy_token_secret();
    let documented = read_text(&istio().join("README.md"));
    for (port, sources) in &admitted {
        if *port == admin {
            continue;
        }
        assert_eq!(
            sources, &admitted[&check],
            "port {port} takes the callers of the check port"
        );
        for source in sources {
            assert_ne!(source, &admitted[&admin][0], "proxies are not operators");
            // Every namespace admitted is one the README gives the check token.
            for namespace in source["namespaces"].as_array().into_iter().flatten() {
                let step = format!(
                    "-n {} create secret generic {proxy_secret}",
                    namespace.as_str().unwrap()
                );
                assert!(
                    documented.contains(&step),
                    "deploy/istio/README.md: `kubectl {step}`"
                );
            }
        }
    }

    // deploy/kubernetes's NetworkPolicy lets the pods reach Redis and DNS only: the
    // sidecar's control plane, and nothing more, comes from here.
    let network = controller_policy(
        &istio().join("networkpolicy.yaml"),
        "NetworkPolicy",
        "sluice-controller-istio",
        "/spec/podSelector",
    );
    assert_eq!(network["apiVersion"], "networking.k8s.io/v1");
    assert_eq!(
        network["spec"]["policyTypes"],
        serde_json::json!(["Egress"]),
        "it opens no port into the pods"
    );
    assert!(network["spec"].get("ingress").is_none());
    let egress = list(&network, "/spec/egress");
    assert_eq!(egress.len(), 1);
    assert_eq!(
        egress[0]["ports"],
        serde_json::json!([{ "port": 15012, "protocol": "TCP" }])
    );
    let [istiod] = list(&egress[0], "/to").as_slice() else {
        panic!("one destination: {}", egress[0]);
    };
    assert_eq!(
        istiod["namespaceSelector"]["matchLabels"],
        serde_json::json!({
            "kubernetes.io/metadata.name": text(&wasm_plugin(), "/metadata/namespace")
        }),
        "istiod in Istio's namespace, the WasmPlugin's"
    );
    assert_eq!(
        istiod["podSelector"]["matchLabels"],
        serde_json::json!({ "app": "istiod" })
    );
}

/// The variable the README's sidecar patch sets in `istio-proxy` from a Secret, and that
/// Secret's (name, key), after checking the patch: it labels the pods the WasmPlugin
/// selects, lets the injector fill in the sidecar, and sets one variable from a Secret.
fn proxy_token_variable() -> (String, (String, String)) {
    let readme_path = istio().join("README.md");
    let patch = readme_yaml_blocks(&readme_path)
        .into_iter()
        .find(|block| block.to_string().contains("istio-proxy"))
        .expect("deploy/istio/README.md shows the sidecar patch as a yaml block");
    let template = &patch["spec"]["template"];
    assert!(
        selects(&proxy_selector(), &template["metadata"]["labels"]),
        "the patch labels the pods the WasmPlugin selects"
    );
    let sidecar = list(template, "/spec/containers")
        .iter()
        .find(|container| container["name"] == "istio-proxy")
        .expect("the patch overrides the container istio-proxy")
        .clone();
    assert_eq!(
        sidecar["image"], "auto",
        "the injector fills in the sidecar's image"
    );
    let [variable] = list(&sidecar, "/env").as_slice() else {
        panic!("the patch sets one variable in istio-proxy: {sidecar}");
    };
    assert_eq!(
        keys(variable),
        BTreeSet::from(["name", "valueFrom"]),
        "{variable}"
    );
    let reference = &variable["valueFrom"]["secretKeyRef"];
    assert_ne!(reference["optional"], true, "{reference}");
    (
        text(variable, "/name").to_owned(),
        (
            text(reference, "/name").to_owned(),
            text(reference, "/key").to_owned(),
        ),
    )
}

/// The Secret (name, key) the README's sidecar patch takes the check token from.
fn proxy_token_secret() -> (String, String) {
    proxy_token_variable().1
}

/// `kubectl create secret generic <name> --from-literal=<key>=…` appears in `readme`.
fn tells_how_to_create(readme_path: &Path, name: &str, key: &str) {
    let documented = read_text(readme_path);
    let create = format!("create secret generic {name}");
    let at = documented
        .find(&create)
        .unwrap_or_else(|| panic!("{}: no `{create}`", readme_path.display()));
    let command: String = documented[at..].chars().take(300).collect();
    assert!(
        command.contains(&format!("--from-literal={key}=")),
        "{}: `{create}` with the key {key}: {command}",
        readme_path.display()
    );
}

/// The check token: the controller reads `SLUICE_CHECK_TOKENS` from a Secret (never a value
/// in the manifest, never optional), the WasmPlugin hands the VM the one proxy variable its
/// `pluginConfig` names and carries no token itself, and the README's sidecar patch sets that
/// variable from a Secret copied from the controller's. Each Secret is one a README tells
/// how to create, with the key the manifests read.
#[test]
fn the_check_token_goes_from_secrets_to_the_controller_and_the_proxies() {
    let container = controller_container();
    for variable in list(&container, "/env") {
        let Some(reference) = variable.pointer("/valueFrom/secretKeyRef") else {
            continue;
        };
        assert_ne!(reference["optional"], true, "{variable}");
        tells_how_to_create(
            &kubernetes().join("README.md"),
            text(reference, "/name"),
            text(reference, "/key"),
        );
    }
    let tokens = env(&container, "SLUICE_CHECK_TOKENS");
    assert_eq!(
        keys(tokens),
        BTreeSet::from(["name", "valueFrom"]),
        "{tokens}"
    );
    let reference = &tokens["valueFrom"]["secretKeyRef"];
    let (name, key) = (text(reference, "/name"), text(reference, "/key"));
    assert_ne!(
        name,
        text(
            env(&container, "SLUICE_ADMIN_TOKENS"),
            "/valueFrom/secretKeyRef/name"
        ),
        "the check token and the admin tokens apart"
    );

    let controller = &plugin_config_json()["controller"];
    assert!(
        controller.get("token").is_none(),
        "no credential in the WasmPlugin: {controller}"
    );
    let variable = text(controller, "/token_env");
    assert_eq!(
        wasm_plugin()["spec"]["vmConfig"]["env"],
        serde_json::json!([{ "name": variable, "valueFrom": "HOST" }]),
        "the VM gets that one variable, from the proxy's environment, no value inline"
    );

    let (patched, (proxy_secret, proxy_key)) = proxy_token_variable();
    assert_eq!(
        patched, variable,
        "the sidecar patch sets the variable the filter reads"
    );
    // A labelled pod without the patch: its proxy has no such variable, Istio hands the VM
    // none, and the filter refuses to start, naming the field (the README says so).
    let json = serde_json::to_string(&plugin_config_json()).unwrap();
    let unpatched = vm_environment(&BTreeMap::new());
    let error = FilterConfig::parse_with_env(json.as_bytes(), &|name| unpatched.get(name).cloned())
        .expect_err("no token, no filter");
    assert_eq!(error.field, "controller.token_env", "{error}");
    let istio_readme = istio().join("README.md");
    tells_how_to_create(&istio_readme, &proxy_secret, &proxy_key);
    // The proxies' copy is taken from the controller's Secret.
    let documented = read_text(&istio_readme);
    for part in [format!("get secret {name}"), format!("{{.data.{key}}}")] {
        assert!(
            documented.contains(&part),
            "deploy/istio/README.md copies the token from the controller's Secret: {part}"
        );
    }
}

/// The gateway's WasmPlugin runs the sidecars' image with the sidecars' configuration, but
/// is matched where a gateway carries requests (CLIENT: with SERVER it would select the
/// gateway and never run), takes the client's address as an edge proxy sees it, and may
/// call the controller.
#[test]
fn the_gateway_wasm_plugin_runs_the_sidecars_filter_where_the_gateway_carries_requests() {
    let sidecar = wasm_plugin();
    let gateway = wasm_plugin_at(&gateway_wasm_plugin_file());
    assert_eq!(text(&gateway, "/metadata/namespace"), "istio-system");
    assert_ne!(
        text(&gateway, "/metadata/name"),
        text(&sidecar, "/metadata/name"),
        "two WasmPlugins of one name in one namespace would replace each other"
    );
    let spec = &gateway["spec"];
    assert_eq!(spec["match"], serde_json::json!([{ "mode": "CLIENT" }]));
    assert_eq!(
        spec["selector"]["matchLabels"],
        serde_json::json!({ "istio": "ingressgateway" })
    );
    for same in [
        "/url",
        "/sha256",
        "/phase",
        "/priority",
        "/failStrategy",
        "/type",
        "/pluginName",
        "/vmConfig",
        "/imagePullPolicy",
    ] {
        assert_eq!(
            gateway["spec"].pointer(same),
            sidecar["spec"].pointer(same),
            "spec{same} differs from the sidecars' WasmPlugin"
        );
    }
    // The filter's configuration is the sidecars' but for the client's address.
    let (mut gateway_config, mut sidecar_config) = (
        spec["pluginConfig"].clone(),
        sidecar["spec"]["pluginConfig"].clone(),
    );
    let gateway_ip = gateway_config["identity"]["ip"].take();
    sidecar_config["identity"]["ip"].take();
    assert_eq!(gateway_config, sidecar_config);
    let json = serde_json::to_string(&spec["pluginConfig"]).unwrap();
    let config = parse_in_patched_proxy(&json)
        .unwrap_or_else(|e| panic!("the gateway's pluginConfig is refused: {e}\n{json}"));
    // An Istio gateway's connection manager runs with use_remote_address: Envoy appends the
    // peer to X-Forwarded-For, and that entry is the peer's.
    assert!(config.identity.ip.envoy_appends, "{gateway_ip}");
    // The gateway's namespace may call the check port.
    let policy = resource(
        &istio().join("authorizationpolicy.yaml"),
        "AuthorizationPolicy",
        "sluice-controller",
    );
    let check_port_sources: Vec<&Value> = list(&policy, "/spec/rules")
        .iter()
        .filter(|rule| rule["to"][0]["operation"]["ports"] == serde_json::json!(["8081"]))
        .flat_map(|rule| rule["from"].as_array().into_iter().flatten())
        .collect();
    assert!(
        check_port_sources
            .iter()
            .any(|from| from["source"]["namespaces"]
                .as_array()
                .is_some_and(|names| names.iter().any(|n| n == "istio-system"))),
        "{check_port_sources:?}"
    );
}
