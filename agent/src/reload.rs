//! `SIGHUP` (systemd's `ExecReload=`): re-read the configuration files.
//!
//! The files are loaded exactly as at start-up — defaults → file →
//! `conf.d/*.toml` → the applied fleet layer → the environment — and
//! validated by the same code that checks a fleet configuration
//! ([`crate::config::load`]). The result is compared with the running
//! configuration: nothing changed → nothing happens; only `[[rules]]`
//! changed → the rules are swapped into the pipeline in place (as a fleet
//! configuration would be); anything else → an in-process restart with the
//! new files (the process and its PID stay, like a fleet restart). Files
//! that do not load or validate change nothing: the error, naming the key,
//! is logged and the daemon keeps running with what it has.

use crate::config::{self, Config, ConfigError, RawConfig};
use std::path::Path;

/// What a reload does.
#[derive(Debug)]
pub enum Reload {
    /// The files give the running configuration.
    Unchanged,
    /// Only `[[rules]]` differ: apply these in place.
    Rules(Box<Config>),
    /// Something else differs: restart in process with the files.
    Restart,
    /// The files do not load or validate: keep running unchanged.
    Invalid(ConfigError),
}

/// Loads the configuration from `path` and compares it with `running`
/// (the raw configuration in force).
pub fn plan(running: &RawConfig, path: &Path) -> Reload {
    let new = match config::load(path) {
        Ok(c) => c,
        Err(e) => return Reload::Invalid(e),
    };
    let as_json = |raw: &RawConfig| serde_json::to_value(raw).ok();
    if as_json(running) == as_json(&new.raw) {
        return Reload::Unchanged;
    }
    let without_rules = |raw: &RawConfig| {
        let mut raw = raw.clone();
        raw.rules.clear();
        as_json(&raw)
    };
    if without_rules(running) == without_rules(&new.raw) {
        Reload::Rules(Box::new(new))
    } else {
        Reload::Restart
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, extra: &str) {
        let state = path.parent().unwrap().join("state");
        std::fs::write(
            path,
            format!(
                "[gateway]\nid = \"g\"\nstate_dir = \"{}\"\n{extra}",
                state.display()
            ),
        )
        .unwrap();
    }

    const RULE: &str =
        "\n[[rules]]\nname = \"no-secret\"\nkeys = \"secret\"\nactions = [{ type = \"drop\" }]\n";

    #[test]
    fn unchanged_rules_only_other_keys_and_invalid_files_are_told_apart() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("sluice.toml");
        write(&path, "");
        let running = config::load(&path).unwrap().raw;
        assert!(matches!(plan(&running, &path), Reload::Unchanged));

        write(&path, RULE);
        match plan(&running, &path) {
            Reload::Rules(c) => assert_eq!(c.rules.len(), 1),
            other => panic!("{other:?}"),
        }

        write(&path, "[outbox]\nmax_bytes = \"1MiB\"\n");
        assert!(matches!(plan(&running, &path), Reload::Restart));

        write(&path, "[outbox]\nmax_bytes = \"12XB\"\n");
        match plan(&running, &path) {
            Reload::Invalid(e) => assert!(e.to_string().contains("outbox.max_bytes"), "{e}"),
            other => panic!("{other:?}"),
        }

        // A drop-in in conf.d/ is read too.
        write(&path, "");
        std::fs::create_dir_all(d.path().join("conf.d")).unwrap();
        std::fs::write(d.path().join("conf.d/rules.toml"), RULE).unwrap();
        assert!(matches!(plan(&running, &path), Reload::Rules(_)));
    }
}
