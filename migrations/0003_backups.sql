-- Backups: retention fields and a record of every restore and restore drill.

-- When a manual or pre-deploy backup may be deleted; scheduled backups are kept by count
-- (days, weeks, months), so theirs stays NULL.
ALTER TABLE ops.backups ADD COLUMN expires_at timestamptz;
-- A pinned backup is never deleted by the retention policy.
ALTER TABLE ops.backups ADD COLUMN keep boolean NOT NULL DEFAULT false;

CREATE INDEX backups_env_status ON ops.backups (env_id, status, created_at DESC);

-- Restores into a new database, rollbacks over an environment's database, and restore
-- drills into a scratch database that is dropped afterwards.
CREATE TABLE ops.restores (
    restore_id   uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    backup_id    uuid        REFERENCES ops.backups ON DELETE SET NULL,
    project_id   text        NOT NULL REFERENCES ops.projects,
    env_id       text        NOT NULL REFERENCES ops.environments,
    run_id       uuid        REFERENCES ops.runs ON DELETE SET NULL,
    kind         text        NOT NULL CHECK (kind IN ('restore', 'replace', 'drill')),
    target_db    text        NOT NULL,
    status       text        NOT NULL DEFAULT 'running'
                     CHECK (status IN ('running', 'success', 'failed')),
    neutralized  boolean     NOT NULL DEFAULT false,
    -- What the verification queries found: row counts, attachments, neutralization.
    checks       jsonb       NOT NULL DEFAULT '{}',
    error        text,
    started_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz
);

CREATE INDEX restores_env ON ops.restores (env_id, started_at DESC);
CREATE INDEX restores_backup ON ops.restores (backup_id);
