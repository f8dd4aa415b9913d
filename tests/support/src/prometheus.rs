//! Parse Prometheus' text exposition with a real parser (the reference
//! Python client's, `python3-prometheus-client`), so tests check our
//! output against someone else's reading of the format.

use std::io::Write;
use std::process::{Command, Stdio};

/// One sample as the parser read it.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// One metric family: name (as the parser names it: a counter's without
/// `_total`), type, help text and samples.
#[derive(Debug, Clone, PartialEq)]
pub struct Family {
    pub name: String,
    pub kind: String,
    pub help: String,
    pub samples: Vec<Sample>,
}

const SCRIPT: &str = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = []
for f in text_string_to_metric_families(sys.stdin.read()):
    out.append({"name": f.name, "type": f.type, "help": f.documentation,
                "samples": [[s.name, sorted(s.labels.items()), s.value] for s in f.samples]})
print(json.dumps(out))
"#;

/// The first Python that has the parser: `python3` on `PATH` may be a
/// private one (pyenv) without the distribution's packages.
fn interpreter() -> Option<&'static str> {
    ["python3", "/usr/bin/python3"].into_iter().find(|py| {
        Command::new(py)
            .args(["-c", "import prometheus_client.parser"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

/// Whether the parser is installed.
pub fn have_parser() -> bool {
    interpreter().is_some()
}

/// Parse `text`; `Err` carries the parser's complaint.
pub fn parse(text: &str) -> Result<Vec<Family>, String> {
    let py = interpreter().ok_or("no python3 with prometheus_client")?;
    let mut child = Command::new(py)
        .args(["-c", SCRIPT])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("python3: {e}"))?;
    let mut stdin = child.stdin.take().expect("piped stdin");
    let input = text.to_string();
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    let _ = writer.join();
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("parser output: {e}"))?;
    let fams = v.as_array().ok_or("parser output is not a list")?;
    Ok(fams
        .iter()
        .map(|f| Family {
            name: f["name"].as_str().unwrap_or_default().to_string(),
            kind: f["type"].as_str().unwrap_or_default().to_string(),
            help: f["help"].as_str().unwrap_or_default().to_string(),
            samples: f["samples"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|s| Sample {
                    name: s[0].as_str().unwrap_or_default().to_string(),
                    labels: s[1]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|kv| {
                            (
                                kv[0].as_str().unwrap_or_default().to_string(),
                                kv[1].as_str().unwrap_or_default().to_string(),
                            )
                        })
                        .collect(),
                    value: s[2].as_f64().unwrap_or(f64::NAN),
                })
                .collect(),
        })
        .collect())
}
