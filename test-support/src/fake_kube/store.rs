//! The object store behind the fake API server: selectors, merge patches, server-side
//! apply with field ownership, and the create/replace/patch/delete handlers. Every write
//! goes through [`State::admit`] (schema, defaults, semantic and immutable-field rules) and
//! lands in the event log that watches read.

use std::collections::{BTreeSet, HashMap};

use serde_json::{json, Value};

use super::immutable;
use super::validate::{self, FieldValidation, WriteKind};
use super::{
    api_version_of, kind_of, metadata_mut, not_found, stale_conflict, status_error,
    status_with_reason, Collection, Key, Operation, Reply, State, Target, STATUS_SUBRESOURCE,
};

/// One label selector requirement.
pub(super) enum Requirement {
    Eq(String, String),
    Ne(String, String),
    Exists(String),
    Absent(String),
}

pub(super) fn parse_label_selector(sel: &str) -> Result<Vec<Requirement>, String> {
    let mut out = Vec::new();
    for part in sel.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if part.contains(" in ") || part.contains(" notin ") || part.contains('(') {
            return Err(format!(
                "set-based label selector {part:?} is not supported by the fake API server"
            ));
        }
        let r = if let Some((k, v)) = part.split_once("!=") {
            Requirement::Ne(k.trim().into(), v.trim().into())
        } else if let Some((k, v)) = part.split_once("==") {
            Requirement::Eq(k.trim().into(), v.trim().into())
        } else if let Some((k, v)) = part.split_once('=') {
            Requirement::Eq(k.trim().into(), v.trim().into())
        } else if let Some(k) = part.strip_prefix('!') {
            Requirement::Absent(k.trim().into())
        } else {
            Requirement::Exists(part.into())
        };
        out.push(r);
    }
    Ok(out)
}

pub(super) fn labels_match(obj: &Value, reqs: &[Requirement]) -> bool {
    let labels = &obj["metadata"]["labels"];
    reqs.iter().all(|r| match r {
        Requirement::Eq(k, v) => labels[k].as_str() == Some(v),
        Requirement::Ne(k, v) => labels[k].as_str() != Some(v),
        Requirement::Exists(k) => labels.get(k).is_some(),
        Requirement::Absent(k) => labels.get(k).is_none(),
    })
}

pub(super) fn fields_match(obj: &Value, sel: &str) -> Result<bool, String> {
    for part in sel.split(',').filter(|p| !p.is_empty()) {
        let (field, want, negate) = if let Some((f, v)) = part.split_once("!=") {
            (f, v, true)
        } else if let Some((f, v)) = part.split_once("==") {
            (f, v, false)
        } else if let Some((f, v)) = part.split_once('=') {
            (f, v, false)
        } else {
            return Err(format!("invalid field selector {part:?}"));
        };
        let have = match field {
            "metadata.name" => obj["metadata"]["name"].as_str(),
            "metadata.namespace" => obj["metadata"]["namespace"].as_str(),
            other => {
                return Err(format!(
                    "field selector {other:?} is not supported by the fake API server"
                ))
            }
        };
        if (have == Some(want)) == negate {
            return Ok(false);
        }
    }
    Ok(true)
}

/// A field's path inside an object, one segment per map key (lists are leaves).
pub(super) type FieldPath = Vec<String>;

/// `.spec.template` — how field paths read in messages.
fn show(path: &FieldPath) -> String {
    path.iter().map(|s| format!(".{s}")).collect()
}

/// Paths of the leaves of `v` (lists and empty objects are leaves).
fn leaves(v: &Value, prefix: &mut FieldPath, out: &mut BTreeSet<FieldPath>) {
    match v.as_object() {
        Some(m) if !m.is_empty() => {
            for (k, child) in m {
                prefix.push(k.clone());
                leaves(child, prefix, out);
                prefix.pop();
            }
        }
        _ => {
            out.insert(prefix.clone());
        }
    }
}

fn lookup<'a>(v: &'a Value, path: &FieldPath) -> Option<&'a Value> {
    path.iter().try_fold(v, |cur, seg| cur.get(seg))
}

/// Removes the field at `path`, then every parent object that became empty (as the real
/// server removes a field whose last owner stopped applying it).
fn remove_field(v: &mut Value, path: &[String]) {
    let Some((first, rest)) = path.split_first() else {
        return;
    };
    let Some(map) = v.as_object_mut() else {
        return;
    };
    if rest.is_empty() {
        map.remove(first);
        return;
    }
    if let Some(child) = map.get_mut(first) {
        remove_field(child, rest);
        if child.as_object().is_some_and(serde_json::Map::is_empty) {
            map.remove(first);
        }
    }
}

/// The fields an apply request manages (identity and server-set metadata excluded).
fn applied_fields(obj: &Value) -> BTreeSet<FieldPath> {
    let mut out = BTreeSet::new();
    leaves(obj, &mut Vec::new(), &mut out);
    const SERVER_SET: [&[&str]; 9] = [
        &["apiVersion"],
        &["kind"],
        &["metadata", "name"],
        &["metadata", "namespace"],
        &["metadata", "resourceVersion"],
        &["metadata", "uid"],
        &["metadata", "creationTimestamp"],
        &["metadata", "generation"],
        &["metadata", "managedFields"],
    ];
    out.retain(|p| {
        !SERVER_SET
            .iter()
            .any(|s| p.len() >= s.len() && p[..s.len()] == **s)
    });
    out
}

/// Minimal base64 (RFC 4648, with padding) for `stringData`.
pub fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

impl State {
    pub(super) fn bump(&mut self) -> String {
        self.revision += 1;
        self.revision.to_string()
    }

    fn namespace_exists(&self, ns: &str) -> bool {
        self.objects.contains_key(&Key {
            group_version: "api/v1".into(),
            namespace: None,
            plural: "namespaces".into(),
            name: ns.into(),
        })
    }

    fn list(&self, c: &Collection, params: &HashMap<String, String>) -> Result<Vec<Key>, Reply> {
        let labels = parse_label_selector(params.get("labelSelector").map_or("", String::as_str))
            .map_err(|e| status_error(400, e, None))?;
        let mut keys = Vec::new();
        for (k, obj) in &self.objects {
            if !c.contains(k) || !labels_match(obj, &labels) {
                continue;
            }
            let fields = params.get("fieldSelector").map_or("", String::as_str);
            if fields_match(obj, fields).map_err(|e| status_error(400, e, None))? {
                keys.push(k.clone());
            }
        }
        Ok(keys)
    }

    fn list_body(&self, c: &Collection, items: Vec<Value>) -> Value {
        json!({
            "apiVersion": api_version_of(&c.group_version),
            "kind": format!("{}List", kind_of(&c.plural)),
            "metadata": {"resourceVersion": self.revision.to_string()},
            "items": items,
        })
    }

    pub(super) fn dispatch(
        &mut self,
        method: &str,
        target: &Target,
        params: &HashMap<String, String>,
        content_type: &str,
        body: &[u8],
    ) -> Reply {
        match (method, target) {
            ("GET", Target::Version) => Reply::json(
                200,
                &json!({
                    "major": "1", "minor": "34", "gitVersion": "v1.34.0",
                    "gitCommit": "fake", "gitTreeState": "clean",
                    "buildDate": "2026-01-01T00:00:00Z", "goVersion": "go1.24",
                    "compiler": "gc", "platform": "linux/amd64"
                }),
            ),
            ("GET", Target::Collection(c)) => match self.list(c, params) {
                Ok(keys) => {
                    let items = keys.iter().map(|k| self.objects[k].clone()).collect();
                    Reply::json(200, &self.list_body(c, items))
                }
                Err(r) => r,
            },
            ("GET", Target::Object(key) | Target::Status(key)) => match self.objects.get(key) {
                Some(obj) => Reply::json(200, obj),
                None => not_found(key),
            },
            ("POST", Target::Collection(c)) => self.create(c, params, body),
            ("PUT", Target::Object(key)) => self.replace(key, params, body, false),
            ("PUT", Target::Status(key)) => self.replace(key, params, body, true),
            ("PATCH", Target::Object(key)) => self.patch(key, params, content_type, body, false),
            ("PATCH", Target::Status(key)) => self.patch(key, params, content_type, body, true),
            ("DELETE", Target::Object(key)) => self.delete(key, body),
            ("DELETE", Target::Collection(c)) => match self.list(c, params) {
                Ok(keys) => {
                    let items = keys
                        .iter()
                        .filter_map(|k| self.remove_object(k))
                        .collect();
                    Reply::json(200, &self.list_body(c, items))
                }
                Err(r) => r,
            },
            (_, Target::Unknown) => status_error(
                404,
                "the server could not find the requested resource (the fake API server serves /version and resource paths only)",
                None,
            ),
            (m, _) => status_error(405, format!("method {m} is not allowed on this path"), None),
        }
    }

    fn parse_body(body: &[u8]) -> Result<Value, Reply> {
        let v: Value = match serde_json::from_slice(body) {
            Ok(v) => v,
            // Apply bodies may be YAML (kubectl); kube-rs sends JSON.
            Err(_) => clustermesh_api::yaml::from_slice(body).map_err(|e| {
                status_error(
                    400,
                    format!("the request body is neither JSON nor YAML: {e}"),
                    None,
                )
            })?,
        };
        if !v.is_object() {
            return Err(status_error(400, "the request body is not an object", None));
        }
        Ok(v)
    }

    /// Checks apiVersion/kind/name/namespace of a body against where it is sent.
    fn check_identity(key: &Key, obj: &Value) -> Result<(), Reply> {
        let api_version = obj["apiVersion"].as_str().unwrap_or_default();
        let kind = obj["kind"].as_str().unwrap_or_default();
        if api_version != key.api_version() || kind != kind_of(&key.plural) {
            return Err(status_error(
                400,
                format!(
                    "the body is apiVersion {api_version:?} kind {kind:?} but the request is for {} (apiVersion {} kind {})",
                    key.resource(),
                    key.api_version(),
                    kind_of(&key.plural)
                ),
                None,
            ));
        }
        if obj["metadata"]["name"].as_str() != Some(key.name.as_str()) {
            return Err(status_error(
                400,
                format!(
                    "the name of the object ({}) does not match the name on the URL ({})",
                    obj["metadata"]["name"].as_str().unwrap_or_default(),
                    key.name
                ),
                None,
            ));
        }
        if let Some(ns) = obj["metadata"]["namespace"].as_str() {
            if Some(ns) != key.namespace.as_deref() {
                return Err(status_error(
                    400,
                    "the namespace of the provided object does not match the namespace sent on the request",
                    None,
                ));
            }
        }
        Ok(())
    }

    /// Fills server-set fields of an object about to be stored; `previous` is the stored
    /// version for updates.
    fn finish_write(&mut self, key: &Key, obj: &mut Value, previous: Option<&Value>) {
        fold_string_data(key, obj);
        if key.plural == "services" && previous.is_none() {
            self.allocate_service(obj);
        }
        let rv = self.bump();
        let generation = match previous {
            None => 1,
            Some(p) => {
                let g = p["metadata"]["generation"].as_i64().unwrap_or(1);
                if p.get("spec") != obj.get("spec") {
                    g + 1
                } else {
                    g
                }
            }
        };
        let uid = previous
            .and_then(|p| p["metadata"]["uid"].as_str().map(str::to_owned))
            .unwrap_or_else(|| format!("fake-uid-{rv}"));
        let created = previous
            .and_then(|p| {
                p["metadata"]["creationTimestamp"]
                    .as_str()
                    .map(str::to_owned)
            })
            .unwrap_or_else(|| "2026-01-01T00:00:00Z".to_owned());
        let managed = self.managed_fields(key);
        let meta = metadata_mut(obj);
        meta.insert("resourceVersion".into(), json!(rv));
        meta.insert("uid".into(), json!(uid));
        meta.insert("creationTimestamp".into(), json!(created));
        meta.insert("generation".into(), json!(generation));
        if let Some(ns) = &key.namespace {
            meta.insert("namespace".into(), json!(ns));
        }
        if !managed.is_empty() {
            meta.insert("managedFields".into(), Value::Array(managed));
        }
    }

    fn managed_fields(&self, key: &Key) -> Vec<Value> {
        self.managers
            .get(key)
            .map(|m| {
                m.iter()
                    .map(|(name, (op, api_version, _))| {
                        json!({
                            "manager": name,
                            "operation": format!("{op:?}"),
                            "apiVersion": api_version,
                            "time": "2026-01-01T00:00:00Z",
                            "fieldsType": "FieldsV1",
                        })
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    fn allocate_service(&mut self, obj: &mut Value) {
        if obj["spec"]["clusterIP"]
            .as_str()
            .unwrap_or_default()
            .is_empty()
        {
            let n = self.next_cluster_ip;
            self.next_cluster_ip += 1;
            obj["spec"]["clusterIP"] = json!(format!("10.96.{}.{}", n / 250, n % 250 + 1));
        }
        let typ = obj["spec"]["type"]
            .as_str()
            .unwrap_or("ClusterIP")
            .to_owned();
        if typ == "NodePort" || typ == "LoadBalancer" {
            if let Some(ports) = obj["spec"]["ports"].as_array_mut() {
                for p in ports {
                    if p["nodePort"].as_u64().unwrap_or(0) == 0 {
                        p["nodePort"] = json!(self.next_node_port);
                        self.next_node_port += 1;
                    }
                }
            }
        }
    }

    fn record_manager(&mut self, key: &Key, manager: Option<&String>, op: Operation) {
        if let Some(m) = manager {
            let api_version = key.api_version();
            let entry = self.managers.entry(key.clone()).or_default();
            match entry.get_mut(m) {
                // An update by an apply manager keeps its applied field set.
                Some(e) if op == Operation::Update => e.1 = api_version,
                _ => {
                    entry.insert(m.clone(), (op, api_version, BTreeSet::new()));
                }
            }
        }
    }

    /// Stores `obj` at `key` and logs the ADDED/MODIFIED event watches see.
    pub(super) fn put_object(&mut self, key: &Key, obj: Value) {
        let kind = if self.objects.contains_key(key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        self.record_event(kind, key, &obj);
        self.objects.insert(key.clone(), obj);
    }

    /// Removes the object at `key` (and its managers) and logs the DELETED event.
    pub(super) fn remove_object(&mut self, key: &Key) -> Option<Value> {
        let mut obj = self.objects.remove(key)?;
        self.managers.remove(key);
        let rv = self.bump();
        metadata_mut(&mut obj).insert("resourceVersion".into(), json!(rv));
        self.record_event("DELETED", key, &obj);
        Some(obj)
    }

    /// Runs the real server's admission of a write, in its order: schema decoding
    /// (unknown fields dropped or refused per `mode`), `stringData` folding, defaults,
    /// allocated values kept, semantic validation, immutable fields. Returns the
    /// warnings to send.
    fn admit(
        &mut self,
        key: &Key,
        obj: &mut Value,
        previous: Option<&Value>,
        mode: FieldValidation,
    ) -> Result<Vec<String>, Reply> {
        let warnings = validate::check_schema(key, obj, mode, WriteKind::Decode)?;
        fold_string_data(key, obj);
        immutable::apply_defaults(key, obj);
        if let Some(old) = previous {
            immutable::keep_allocated(key, old, obj);
        }
        validate::check_semantics(key, obj)?;
        immutable::check_object(key, obj)?;
        if let Some(old) = previous {
            immutable::check_update(key, old, obj)?;
        }
        self.warnings.extend(warnings.iter().cloned());
        Ok(warnings)
    }

    fn create(&mut self, c: &Collection, params: &HashMap<String, String>, body: &[u8]) -> Reply {
        let mode = match FieldValidation::from_param(params.get("fieldValidation")) {
            Ok(m) => m,
            Err(r) => return r,
        };
        let mut obj = match Self::parse_body(body) {
            Ok(v) => v,
            Err(r) => return r,
        };
        if obj["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .is_empty()
        {
            match obj["metadata"]["generateName"].as_str() {
                Some(prefix) => {
                    let name = format!("{prefix}{:05x}", self.revision + 1);
                    obj["metadata"]["name"] = json!(name);
                }
                None => {
                    return status_error(
                        422,
                        format!(
                            "{} is invalid: metadata.name: Required value: name or generateName is required",
                            kind_of(&c.plural)
                        ),
                        None,
                    )
                }
            }
        }
        let key = c.key(obj["metadata"]["name"].as_str().unwrap_or_default());
        if let Err(r) = Self::check_identity(&key, &obj) {
            return r;
        }
        if let Some(ns) = &key.namespace {
            if !self.namespace_exists(ns) {
                return status_error(404, format!("namespaces \"{ns}\" not found"), None);
            }
        }
        if self.objects.contains_key(&key) {
            return status_with_reason(
                409,
                "AlreadyExists",
                format!("{} \"{}\" already exists", key.resource(), key.name),
                Some((&key, "")),
            );
        }
        if STATUS_SUBRESOURCE.contains(&key.plural.as_str()) {
            if let Some(o) = obj.as_object_mut() {
                o.remove("status");
            }
        }
        let warnings = match self.admit(&key, &mut obj, None, mode) {
            Ok(w) => w,
            Err(r) => return r,
        };
        self.record_manager(&key, params.get("fieldManager"), Operation::Update);
        self.finish_write(&key, &mut obj, None);
        self.put_object(&key, obj.clone());
        Reply::json(201, &obj).with_warnings(warnings)
    }

    /// Keeps the stored status (main resource) or everything but the status (`/status`).
    fn scope_write(key: &Key, stored: &Value, mut new: Value, status_only: bool) -> Value {
        if status_only {
            let mut out = stored.clone();
            out["status"] = new.get("status").cloned().unwrap_or(Value::Null);
            out
        } else {
            if STATUS_SUBRESOURCE.contains(&key.plural.as_str()) {
                match stored.get("status") {
                    Some(s) => new["status"] = s.clone(),
                    None => {
                        if let Some(o) = new.as_object_mut() {
                            o.remove("status");
                        }
                    }
                }
            }
            new
        }
    }

    fn check_resource_version(key: &Key, body: &Value, stored: &Value) -> Result<(), Reply> {
        match body["metadata"]["resourceVersion"].as_str() {
            Some(rv)
                if rv
                    != stored["metadata"]["resourceVersion"]
                        .as_str()
                        .unwrap_or_default() =>
            {
                Err(stale_conflict(key))
            }
            _ => Ok(()),
        }
    }

    /// Admits and stores an update of `stored` at `key`.
    fn write_update(
        &mut self,
        key: &Key,
        stored: &Value,
        mut new: Value,
        params: &HashMap<String, String>,
        mode: FieldValidation,
    ) -> Reply {
        let warnings = match self.admit(key, &mut new, Some(stored), mode) {
            Ok(w) => w,
            Err(r) => return r,
        };
        self.record_manager(key, params.get("fieldManager"), Operation::Update);
        self.finish_write(key, &mut new, Some(stored));
        self.put_object(key, new.clone());
        Reply::json(200, &new).with_warnings(warnings)
    }

    fn replace(
        &mut self,
        key: &Key,
        params: &HashMap<String, String>,
        body: &[u8],
        status_only: bool,
    ) -> Reply {
        let mode = match FieldValidation::from_param(params.get("fieldValidation")) {
            Ok(m) => m,
            Err(r) => return r,
        };
        let obj = match Self::parse_body(body) {
            Ok(v) => v,
            Err(r) => return r,
        };
        if let Err(r) = Self::check_identity(key, &obj) {
            return r;
        }
        let Some(stored) = self.objects.get(key).cloned() else {
            return not_found(key);
        };
        if let Err(r) = Self::check_resource_version(key, &obj, &stored) {
            return r;
        }
        let new = Self::scope_write(key, &stored, obj, status_only);
        self.write_update(key, &stored, new, params, mode)
    }

    fn patch(
        &mut self,
        key: &Key,
        params: &HashMap<String, String>,
        content_type: &str,
        body: &[u8],
        status_only: bool,
    ) -> Reply {
        let mode = match FieldValidation::from_param(params.get("fieldValidation")) {
            Ok(m) => m,
            Err(r) => return r,
        };
        let ct = content_type.split(';').next().unwrap_or_default().trim();
        match ct {
            "application/apply-patch+yaml" => self.apply(key, params, mode, body, status_only),
            "application/merge-patch+json" | "application/strategic-merge-patch+json" => {
                let patch = match Self::parse_body(body) {
                    Ok(v) => v,
                    Err(r) => return r,
                };
                let Some(stored) = self.objects.get(key).cloned() else {
                    return not_found(key);
                };
                if let Err(r) = Self::check_resource_version(key, &patch, &stored) {
                    return r;
                }
                let mut merged = stored.clone();
                json_patch::merge(&mut merged, &patch);
                if let Err(r) = Self::check_identity(key, &merged) {
                    return r;
                }
                let new = Self::scope_write(key, &stored, merged, status_only);
                self.write_update(key, &stored, new, params, mode)
            }
            other => status_error(
                415,
                format!("the fake API server does not support patch content type {other:?}"),
                None,
            ),
        }
    }

    fn apply(
        &mut self,
        key: &Key,
        params: &HashMap<String, String>,
        mode: FieldValidation,
        body: &[u8],
        status_only: bool,
    ) -> Reply {
        let Some(manager) = params
            .get("fieldManager")
            .filter(|m| !m.is_empty())
            .cloned()
        else {
            return status_error(
                400,
                "PATCH with application/apply-patch+yaml requires the fieldManager query parameter",
                None,
            );
        };
        let force = params.get("force").is_some_and(|f| f == "true");
        let mut applied = match Self::parse_body(body) {
            Ok(v) => v,
            Err(r) => return r,
        };
        if let Err(r) = Self::check_identity(key, &applied) {
            return r;
        }
        // The applied configuration becomes a typed patch object: type errors always
        // fail, unknown fields per `fieldValidation`. A partial configuration is fine
        // here (required fields are checked on the merged object).
        let mut warnings = match validate::check_schema(key, &mut applied, mode, WriteKind::Apply) {
            Ok(w) => w,
            Err(r) if r.status == 422 => Vec::new(),
            Err(r) => return r,
        };
        let fields = applied_fields(&applied);
        let stored = self.objects.get(key).cloned();
        let Some(stored) = stored else {
            if let Some(ns) = &key.namespace {
                if !self.namespace_exists(ns) {
                    return status_error(404, format!("namespaces \"{ns}\" not found"), None);
                }
            }
            let mut obj = applied;
            if status_only {
                return not_found(key);
            }
            if STATUS_SUBRESOURCE.contains(&key.plural.as_str()) {
                if let Some(o) = obj.as_object_mut() {
                    o.remove("status");
                }
            }
            match self.admit(key, &mut obj, None, FieldValidation::Ignore) {
                Ok(w) => warnings.extend(w),
                Err(r) => return r,
            }
            self.warnings.extend(warnings.iter().cloned());
            self.managers
                .entry(key.clone())
                .or_default()
                .insert(manager, (Operation::Apply, key.api_version(), fields));
            self.finish_write(key, &mut obj, None);
            self.put_object(key, obj.clone());
            return Reply::json(201, &obj).with_warnings(warnings);
        };
        if let Err(r) = Self::check_resource_version(key, &applied, &stored) {
            return r;
        }
        // Conflicts: fields another apply manager owns whose value this apply changes.
        let mut conflicts = Vec::new();
        if let Some(owners) = self.managers.get(key) {
            for (other, (op, _, owned)) in owners {
                if other == &manager || *op != Operation::Apply {
                    continue;
                }
                for f in fields.intersection(owned) {
                    if lookup(&stored, f) != lookup(&applied, f) {
                        conflicts.push((other.clone(), show(f)));
                    }
                }
            }
        }
        if !conflicts.is_empty() && !force {
            let list: Vec<String> = conflicts
                .iter()
                .map(|(m, f)| format!("conflict with \"{m}\": {f}"))
                .collect();
            return status_error(
                409,
                format!(
                    "Apply failed with {} conflict{}: {}",
                    conflicts.len(),
                    if conflicts.len() == 1 { "" } else { "s" },
                    list.join("\n")
                ),
                Some((key, "")),
            );
        }
        let mut merged = stored.clone();
        let mut patch = applied;
        if let Some(meta) = patch.get_mut("metadata").and_then(Value::as_object_mut) {
            for f in [
                "resourceVersion",
                "uid",
                "creationTimestamp",
                "generation",
                "managedFields",
            ] {
                meta.remove(f);
            }
        }
        // Fields this manager applied before and no longer applies are removed unless
        // another manager owns them (server-side apply's field removal).
        let owners = self.managers.get(key);
        let previously: BTreeSet<FieldPath> = owners
            .and_then(|o| o.get(&manager))
            .filter(|(op, _, _)| *op == Operation::Apply)
            .map(|(_, _, owned)| owned.clone())
            .unwrap_or_default();
        let owned_by_others: BTreeSet<FieldPath> = owners
            .into_iter()
            .flatten()
            .filter(|(m, _)| **m != manager)
            .flat_map(|(_, (_, _, owned))| owned.iter().cloned())
            .collect();
        for gone in previously.difference(&fields) {
            if !owned_by_others.contains(gone) && !fields.iter().any(|f| f.starts_with(gone)) {
                remove_field(&mut merged, gone);
            }
        }
        json_patch::merge(&mut merged, &patch);
        let mut new = Self::scope_write(key, &stored, merged, status_only);
        match self.admit(key, &mut new, Some(&stored), FieldValidation::Ignore) {
            Ok(w) => warnings.extend(w),
            Err(r) => return r,
        }
        self.warnings.extend(warnings.iter().cloned());
        let owners = self.managers.entry(key.clone()).or_default();
        for (m, (_, _, owned)) in owners.iter_mut() {
            if m != &manager {
                owned.retain(|f| !fields.contains(f));
            }
        }
        owners.insert(manager, (Operation::Apply, key.api_version(), fields));
        let unchanged = {
            let strip = |v: &Value| {
                let mut v = v.clone();
                if let Some(meta) = v.get_mut("metadata").and_then(Value::as_object_mut) {
                    meta.remove("managedFields");
                }
                v
            };
            strip(&new) == strip(&stored)
        };
        if unchanged {
            // A no-op apply does not write (resourceVersion unchanged), like the real server.
            let managed = self.managed_fields(key);
            metadata_mut(&mut new).insert("managedFields".into(), Value::Array(managed));
            self.objects.insert(key.clone(), new.clone());
            return Reply::json(200, &new).with_warnings(warnings);
        }
        self.finish_write(key, &mut new, Some(&stored));
        self.put_object(key, new.clone());
        Reply::json(200, &new).with_warnings(warnings)
    }

    fn delete(&mut self, key: &Key, body: &[u8]) -> Reply {
        let Some(stored) = self.objects.get(key) else {
            return not_found(key);
        };
        if !body.is_empty() {
            if let Ok(opts) = serde_json::from_slice::<Value>(body) {
                let pre = &opts["preconditions"];
                for (field, what) in [("resourceVersion", "ResourceVersion"), ("uid", "UID")] {
                    if let Some(want) = pre[field].as_str() {
                        let have = stored["metadata"][field].as_str().unwrap_or_default();
                        if want != have {
                            return status_error(
                                409,
                                format!(
                                    "Precondition failed: {what} in precondition: {want}, {what} in object meta: {have}"
                                ),
                                Some((key, "")),
                            );
                        }
                    }
                }
            }
        }
        let uid = stored["metadata"]["uid"].clone();
        self.remove_object(key);
        Reply::json(
            200,
            &json!({
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Success",
                "details": {"name": key.name, "kind": key.plural, "uid": uid},
            }),
        )
    }
}

/// Folds a Secret's `stringData` into `data` (base64), as the real server does on write.
fn fold_string_data(key: &Key, obj: &mut Value) {
    if key.plural != "secrets" {
        return;
    }
    if let Some(string_data) = obj
        .as_object_mut()
        .and_then(|o| o.remove("stringData"))
        .and_then(|v| v.as_object().cloned())
    {
        for (k, v) in string_data {
            let text = v.as_str().unwrap_or_default().as_bytes().to_vec();
            obj["data"][k] = json!(base64(&text));
        }
    }
}
