//! Which exporter a re-check asks. `exporter_url` is one URL (the exporter beside the actioner)
//! or, for several GPU nodes, a pattern with `{node}`: the node the run is about — the alert's
//! `host` label, else the host part of its `instance` — so a game on node B fails back by B's
//! own GPU, not by the GPU of whatever node the actioner runs on. `gpu_nodes` lists nodes a
//! failback also checks: with one vLLM/Ollama pair for the cluster, vLLM comes back only when
//! no GPU node has a game, wherever its Deployment may land.

/// The placeholder for the node in `exporter_url`.
pub const NODE: &str = "{node}";

/// `exporter_url` as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExporterUrl {
    base: String,
}

impl ExporterUrl {
    /// `url`, without a trailing `/`.
    pub fn new(url: &str) -> Self {
        Self {
            base: url.trim_end_matches('/').to_owned(),
        }
    }

    /// Whether it names the node.
    pub fn per_node(&self) -> bool {
        self.base.contains(NODE)
    }

    /// `path` on the exporter of `node`. With a pattern, a run that names no node, or names
    /// one that is not a host name or an IP address, gets why not (it is never guessed).
    pub fn url(&self, node: Option<&str>, path: &str) -> Result<String, String> {
        self.urls(node, &[], path).map(|mut urls| urls.remove(0))
    }

    /// `path` on the exporter of `node`, then on those of `others` (without repeats); without a
    /// pattern, the one exporter.
    pub fn urls(
        &self,
        node: Option<&str>,
        others: &[String],
        path: &str,
    ) -> Result<Vec<String>, String> {
        if !self.per_node() {
            return Ok(vec![format!("{}{path}", self.base)]);
        }
        let mut urls = vec![self.one(node, path)?];
        for other in others {
            let url = self.one(Some(other), path)?;
            if !urls.contains(&url) {
                urls.push(url);
            }
        }
        Ok(urls)
    }

    /// `path` on the exporter of `node`, for a pattern.
    fn one(&self, node: Option<&str>, path: &str) -> Result<String, String> {
        let node = node.ok_or_else(|| {
            format!(
                "exporter_url names the node ({}) and this run names none: run it from the node's alert, or pass \"node\"",
                self.base
            )
        })?;
        let host = aistack_common::node::url_host(node)
            .ok_or_else(|| format!("{node:?} is not a node name"))?;
        Ok(format!("{}{path}", self.base.replace(NODE, &host)))
    }

    /// What the config check parses: the pattern with a node filled in.
    pub fn example(&self) -> String {
        self.base.replace(NODE, "node.example")
    }
}

/// Whether `node` can name a node in `exporter_url` (see [`aistack_common::node::url_host`]).
pub fn valid_node(node: &str) -> bool {
    aistack_common::node::valid(node)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_url_is_the_same_for_every_run() {
        let url = ExporterUrl::new("http://127.0.0.1:9470/");
        assert!(!url.per_node());
        assert_eq!(
            url.url(None, "/api/v1/gpu").unwrap(),
            "http://127.0.0.1:9470/api/v1/gpu"
        );
        assert_eq!(
            url.url(Some("gpu-b"), "/api/v1/gpu").unwrap(),
            "http://127.0.0.1:9470/api/v1/gpu"
        );
    }

    #[test]
    fn a_pattern_asks_the_node_the_run_is_about() {
        let url = ExporterUrl::new("http://{node}:9470");
        assert!(url.per_node());
        for (node, want) in [
            ("gpu-b", "http://gpu-b:9470/api/v1/gpu"),
            ("gpu-b.lan", "http://gpu-b.lan:9470/api/v1/gpu"),
            ("10.0.0.7", "http://10.0.0.7:9470/api/v1/gpu"),
            ("fd00::7", "http://[fd00::7]:9470/api/v1/gpu"),
            ("[fd00::7]", "http://[fd00::7]:9470/api/v1/gpu"),
            ("gpu-b.lan.", "http://gpu-b.lan.:9470/api/v1/gpu"),
        ] {
            assert_eq!(url.url(Some(node), "/api/v1/gpu").unwrap(), want, "{node}");
        }
        let why = url.url(None, "/api/v1/gpu").unwrap_err();
        assert!(why.contains("names none"), "{why}");
    }

    #[test]
    fn a_failback_asks_the_runs_node_and_every_listed_one_once() {
        let url = ExporterUrl::new("http://{node}:9470");
        let others = ["gpu-a".to_owned(), "gpu-b".to_owned()];
        assert_eq!(
            url.urls(Some("gpu-b"), &others, "/x").unwrap(),
            ["http://gpu-b:9470/x", "http://gpu-a:9470/x"]
        );
        let one = ExporterUrl::new("http://127.0.0.1:9470");
        assert_eq!(
            one.urls(None, &others, "/x").unwrap(),
            ["http://127.0.0.1:9470/x"]
        );
    }

    #[test]
    fn a_node_that_could_point_elsewhere_is_refused() {
        let url = ExporterUrl::new("http://{node}:9470");
        for node in [
            "",
            "evil.example/x?",
            "user@evil.example",
            "gpu-b:80",
            "a..b",
            "-gpu",
            "gpu b",
            "gpu-b#",
            &"a".repeat(300),
            "012.1.1.1",
            "2130706433",
            "0x7f.1",
            "[[fd00::7]]",
            "fe80::1%eth0",
            "gpü-b",
        ] {
            assert!(url.url(Some(node), "/api/v1/gpu").is_err(), "{node:?}");
        }
    }
}
