//! Where a model comes from: a local folder, or a Hugging Face Hub repository downloaded into
//! the local Hugging Face cache.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

const REQUIRED: &[&str] = &["config.json", "tokenizer.json"];
const OPTIONAL: &[&str] = &[
    "generation_config.json",
    "tokenizer_config.json",
    "chat_template.jinja",
];
const INDEX: &str = "model.safetensors.index.json";

/// Resolves `--model` to a local folder, downloading from the Hub when it is a repository id
/// (`owner/name`) and no such local path exists.
pub fn resolve(model: &str, revision: &str) -> Result<PathBuf> {
    let path = Path::new(model);
    if path.exists() {
        return Ok(path.to_path_buf());
    }
    if !looks_like_repo_id(model) {
        bail!("model folder {model} not found");
    }
    download(model, revision).with_context(|| {
        format!("{model} is not a local folder and could not be fetched from the Hugging Face Hub")
    })
}

fn looks_like_repo_id(s: &str) -> bool {
    let mut parts = s.split('/');
    let ok = |p: Option<&str>| {
        p.is_some_and(|p| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        })
    };
    ok(parts.next()) && ok(parts.next()) && parts.next().is_none()
}

fn download(repo_id: &str, revision: &str) -> Result<PathBuf> {
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .with_progress(true)
        .build()
        .context("cannot set up the Hub client")?;
    let repo = api.repo(hf_hub::Repo::with_revision(
        repo_id.to_string(),
        hf_hub::RepoType::Model,
        revision.to_string(),
    ));
    let mut dir = None;
    for file in REQUIRED {
        let local = repo
            .get(file)
            .with_context(|| format!("downloading {file}"))?;
        dir = local.parent().map(Path::to_path_buf);
    }
    for file in OPTIONAL {
        // Absent optional files are normal (older repositories have no chat_template.jinja).
        let _ = repo.get(file);
    }
    match repo.get(INDEX) {
        Ok(index) => {
            let text = std::fs::read_to_string(&index)?;
            let parsed: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("{}: invalid JSON", index.display()))?;
            let mut shards: Vec<&str> = parsed
                .get("weight_map")
                .and_then(|m| m.as_object())
                .map(|m| m.values().filter_map(|v| v.as_str()).collect())
                .unwrap_or_default();
            shards.sort_unstable();
            shards.dedup();
            for shard in shards {
                repo.get(shard)
                    .with_context(|| format!("downloading {shard}"))?;
            }
        }
        Err(_) => {
            repo.get("model.safetensors")
                .context("downloading model.safetensors")?;
        }
    }
    dir.context("the Hub client returned no local path")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids_are_told_from_paths() {
        assert!(looks_like_repo_id(
            "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"
        ));
        assert!(!looks_like_repo_id("./models/x"));
        assert!(!looks_like_repo_id("/abs/path"));
        assert!(!looks_like_repo_id("a/b/c"));
        assert!(!looks_like_repo_id("single"));
    }
}
