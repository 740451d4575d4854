//! `enclave redact`: the sensitive-data detector on stdin, so operators can try a policy on
//! their own text before turning it on.

use std::io::{Read, Write};

use anyhow::{Context, Result};
use clap::Args;
use serde_json::json;

use crate::config::Settings;

#[derive(Args, Debug)]
pub struct RedactArgs {
    /// Print one JSON object: the redacted text and the findings (category, byte span in the
    /// input).
    #[arg(long)]
    pub json: bool,
    /// Only these categories (comma-separated; default: `[redaction] categories`, or all).
    #[arg(long, value_delimiter = ',')]
    pub categories: Option<Vec<String>>,
    /// List the categories and their placeholders, and exit.
    #[arg(long)]
    pub list: bool,
}

pub fn run(settings: &Settings, args: RedactArgs) -> Result<()> {
    let redaction = match &args.categories {
        Some(categories) => settings
            .redaction
            .detector(Some(categories), "--categories")?,
        None => settings.redaction.redactor()?,
    };
    if args.list {
        for category in redaction.categories() {
            println!("{:<20}  {}", category.name(), category.placeholder());
        }
        return Ok(());
    }
    let mut input = Vec::new();
    std::io::stdin()
        .read_to_end(&mut input)
        .context("cannot read stdin")?;
    let text = String::from_utf8(input).map_err(|e| {
        anyhow::anyhow!(
            "stdin is not UTF-8 text (invalid byte at offset {})",
            e.utf8_error().valid_up_to()
        )
    })?;
    let redacted = redaction.redact(&text);
    let mut out = std::io::stdout().lock();
    if args.json {
        let findings: Vec<_> = redacted
            .findings
            .iter()
            .map(|f| {
                json!({"category": f.category.name(), "placeholder": f.category.placeholder(),
                    "start": f.start, "end": f.end})
            })
            .collect();
        writeln!(
            out,
            "{}",
            json!({"text": redacted.text, "findings": findings})
        )?;
    } else {
        out.write_all(redacted.text.as_bytes())?;
    }
    out.flush()?;
    Ok(())
}
