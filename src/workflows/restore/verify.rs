//! Checks of a restored database against its backup's manifest.

use std::path::Path;

use anyhow::{bail, Context};
use serde_json::{json, Map, Value};

use crate::workflows::backup::pg::quote_literal;
use crate::workflows::backup::process::PgRunner;

/// Tables a restore always compares with the manifest; a drill compares every table.
const KEY_TABLES: &[&str] = &[
    "public.ir_module_module",
    "public.ir_attachment",
    "public.res_company",
    "public.res_users",
    "public.res_partner",
];

/// Missing attachment files listed by name in a drill's result, at most.
const MAX_LISTED_MISSING: usize = 20;

/// Counts rows of the manifest's tables (all of them, or the key tables) in `db` and
/// fails when any count differs. Returns the counts compared.
pub async fn row_counts(
    pg: &PgRunner,
    db: &str,
    manifest: &Value,
    all_tables: bool,
) -> anyhow::Result<Value> {
    let expected = manifest["odooops"]["tables"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    let tables: Vec<&String> = expected
        .keys()
        .filter(|name| all_tables || KEY_TABLES.contains(&name.as_str()))
        .collect();
    if tables.is_empty() {
        return Ok(json!({}));
    }
    let names: Vec<String> = tables.iter().map(|name| quote_literal(name)).collect();
    // to_regclass parses each name as pg_dump wrote it, and its text form is quoted
    // safely for the count query.
    let sql = format!(
        "SELECT json_object_agg(t.name, CASE WHEN to_regclass(t.name) IS NULL THEN -1 ELSE \
         (xpath('/row/c/text()', query_to_xml(format('SELECT count(*) AS c FROM %s', \
         to_regclass(t.name)), false, true, '')))[1]::text::bigint END) \
         FROM unnest(ARRAY[{}]::text[]) AS t(name)",
        names.join(", ")
    );
    let found = pg
        .query_json(db, &sql)
        .await
        .context("counting restored rows failed")?;
    let mismatches = compare_counts(&expected, &found);
    if !mismatches.is_empty() {
        bail!(
            "restored row counts differ from the backup's manifest: {}",
            mismatches.join("; ")
        );
    }
    Ok(found)
}

fn compare_counts(expected: &Map<String, Value>, found: &Value) -> Vec<String> {
    let mut mismatches = Vec::new();
    if let Some(found) = found.as_object() {
        for (table, count) in found {
            let want = expected.get(table).and_then(Value::as_i64).unwrap_or(-1);
            let have = count.as_i64().unwrap_or(-1);
            if want != have {
                let have = if have < 0 {
                    "missing".to_string()
                } else {
                    have.to_string()
                };
                mismatches.push(format!("{table}: expected {want}, found {have}"));
            }
        }
    }
    mismatches
}

/// Checks that every ir_attachment stored in the filestore has its file under `dir`.
pub async fn attachments(pg: &PgRunner, db: &str, dir: &Path) -> anyhow::Result<Value> {
    // NOTE: the names travel as one JSON array through psql, so a database with millions
    // of attachments needs tens of megabytes of memory here.
    let names = pg
        .query_json(
            db,
            "SELECT coalesce(json_agg(DISTINCT store_fname), '[]') FROM ir_attachment \
             WHERE store_fname IS NOT NULL AND store_fname <> ''",
        )
        .await
        .context("listing stored attachments failed")?;
    let names: Vec<String> =
        serde_json::from_value(names).context("attachment list is malformed")?;
    let mut missing = Vec::new();
    for name in &names {
        let present = !name.contains("..") && tokio::fs::metadata(dir.join(name)).await.is_ok();
        if !present {
            missing.push(name.clone());
        }
    }
    if !missing.is_empty() {
        let listed: Vec<&String> = missing.iter().take(MAX_LISTED_MISSING).collect();
        bail!(
            "{} of {} attachment files are missing from the restored filestore, such as {listed:?}",
            missing.len(),
            names.len()
        );
    }
    Ok(json!({ "checked": names.len(), "missing": 0 }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differing_and_missing_tables_are_reported() {
        let expected = json!({ "public.a": 3, "public.b": 5, "public.c": 1 });
        let found = json!({ "public.a": 3, "public.b": 4, "public.c": -1 });
        let mismatches = compare_counts(expected.as_object().unwrap(), &found);
        assert_eq!(
            mismatches,
            vec![
                "public.b: expected 5, found 4",
                "public.c: expected 1, found missing"
            ]
        );
    }
}
