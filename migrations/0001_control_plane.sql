-- The ops control plane: projects, environments, the run queue and what runs leave behind.
--
-- Function and parameter names are a public API: GitHub workflows, Supabase edge functions
-- and the console call them over PostgREST with named arguments.

CREATE SCHEMA IF NOT EXISTS ops;

CREATE TABLE ops.projects (
    project_id  text PRIMARY KEY,
    name        text        NOT NULL DEFAULT '',
    -- Where the agent fetches sources: an https or ssh URL, a local path or a file:// URL.
    repo_url    text,
    -- Image repository without a tag, for example 'ghcr.io/acme/odoo-ce'.
    image       text,
    config      jsonb       NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(config) = 'object'),
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE ops.environments (
    env_id      text PRIMARY KEY,
    project_id  text        NOT NULL REFERENCES ops.projects ON DELETE CASCADE,
    env_type    text        NOT NULL CHECK (env_type IN ('dev', 'staging', 'prod')),
    name        text        NOT NULL DEFAULT '',
    db_name     text        NOT NULL,
    -- droplet_id, deploy_url, and the container settings the deploy workflow reads.
    config      jsonb       NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(config) = 'object'),
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX environments_project ON ops.environments (project_id, env_type);

-- Retry policy per workflow. A run whose lease expires goes back to the queue while it has
-- attempts left, and fails otherwise. A workflow missing here is unknown: any agent serving
-- the environment claims such a run and fails it with an event that says so.
CREATE TABLE ops.workflows (
    workflow      text PRIMARY KEY,
    max_attempts  integer  NOT NULL CHECK (max_attempts >= 1),
    retry_delay   interval NOT NULL DEFAULT '5 seconds',
    description   text     NOT NULL DEFAULT ''
);

INSERT INTO ops.workflows (workflow, max_attempts, description) VALUES
    ('build', 3, 'fetch, build, test and push an image; safe to repeat'),
    ('deploy', 2, 'replace the environment''s container; repeating converges on the same image'),
    ('promote', 2, 'deploy a sha already deployed to another environment'),
    ('rollback', 2, 'redeploy an earlier run''s image'),
    ('backup', 3, 'dump database and filestore to storage; a retry writes a new object'),
    ('restore', 1, 'restore into a new database; a second attempt would find it half made'),
    ('restore_drill', 2, 'restore into a scratch database, verify it, drop it');

CREATE TABLE ops.runs (
    run_id               uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    project_id           text        NOT NULL REFERENCES ops.projects,
    env_id               text        NOT NULL REFERENCES ops.environments,
    status               text        NOT NULL DEFAULT 'queued' CHECK (status IN
                             ('pending_approval', 'queued', 'running',
                              'success', 'failed', 'cancelled')),
    git_sha              text,
    git_ref              text,
    metadata             jsonb       NOT NULL DEFAULT '{}'
                             CHECK (jsonb_typeof(metadata) = 'object'),
    -- Copied from metadata->>'workflow' on insert; runs queued without one are builds.
    workflow             text        NOT NULL DEFAULT 'build',
    attempt              integer     NOT NULL DEFAULT 0,
    max_attempts         integer     NOT NULL DEFAULT 1,
    -- A requeued run waits until then, so a run that kills its agent does not spin.
    run_after            timestamptz NOT NULL DEFAULT now(),
    worker_id            text,
    lease_token          uuid,
    lease_expires_at     timestamptz,
    heartbeat_at         timestamptz,
    cancel_requested_at  timestamptz,
    -- Highest seq in ops.run_events for this run, and the last event batch written, so a
    -- batch retried after a lost connection is not stored twice.
    event_seq            bigint      NOT NULL DEFAULT 0,
    last_event_batch     uuid,
    created_at           timestamptz NOT NULL DEFAULT now(),
    started_at           timestamptz,
    finished_at          timestamptz
);

-- Claim order. Only queued rows are in it, so it stays small however long the history grows.
CREATE INDEX runs_queued ON ops.runs (created_at) WHERE status = 'queued';
CREATE INDEX runs_leased ON ops.runs (lease_expires_at) WHERE status = 'running';
-- The rollback query: the latest successful run of a project in an environment.
CREATE INDEX runs_env_success ON ops.runs (project_id, env_id, finished_at DESC)
    WHERE status = 'success';
CREATE INDEX runs_created ON ops.runs (created_at);

-- Rows are written only through append_event and ops.append_events, which lock the run
-- first. A foreign key would check every line again and halve the ingest rate.
CREATE TABLE ops.run_events (
    run_id      uuid        NOT NULL,
    seq         bigint      NOT NULL,
    level       text        NOT NULL CHECK (level IN ('debug', 'info', 'warn', 'error')),
    message     text        NOT NULL,
    payload     jsonb,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, seq)
);

CREATE TABLE ops.artifacts (
    artifact_id    uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    run_id         uuid        NOT NULL REFERENCES ops.runs ON DELETE CASCADE,
    artifact_type  text        NOT NULL
                       CHECK (artifact_type IN ('image', 'sbom', 'logs', 'evidence', 'manifest')),
    storage_path   text        NOT NULL,
    digest         text,
    size_bytes     bigint,
    metadata       jsonb       NOT NULL DEFAULT '{}',
    created_at     timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX artifacts_run ON ops.artifacts (run_id);
CREATE INDEX artifacts_created ON ops.artifacts (created_at);

CREATE TABLE ops.backups (
    backup_id     uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    project_id    text        NOT NULL REFERENCES ops.projects,
    env_id        text        NOT NULL REFERENCES ops.environments,
    run_id        uuid        REFERENCES ops.runs ON DELETE SET NULL,
    backup_type   text        NOT NULL DEFAULT 'manual' CHECK (backup_type IN
                      ('manual', 'daily', 'weekly', 'monthly', 'pre_deploy')),
    status        text        NOT NULL DEFAULT 'pending' CHECK (status IN
                      ('pending', 'running', 'success', 'failed', 'deleted')),
    db_dump_path  text,
    size_bytes    bigint,
    digest        text,
    format        text,
    manifest      jsonb,
    error         text,
    metadata      jsonb       NOT NULL DEFAULT '{}',
    created_at    timestamptz NOT NULL DEFAULT now(),
    started_at    timestamptz,
    finished_at   timestamptz
);

CREATE INDEX backups_env ON ops.backups (project_id, env_id, created_at DESC);

CREATE TABLE ops.approvals (
    approval_id  uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    run_id       uuid        REFERENCES ops.runs ON DELETE CASCADE,
    status       text        NOT NULL DEFAULT 'pending'
                     CHECK (status IN ('pending', 'approved', 'rejected')),
    approved_by  text,
    approved_at  timestamptz,
    metadata     jsonb       NOT NULL DEFAULT '{}',
    created_at   timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX approvals_run ON ops.approvals (run_id);

-- Lease errors carry their own SQLSTATE so the agent can tell "you lost this run" apart
-- from an outage: OPL01 means the caller's lease is gone, OPN01 that the run does not exist.

CREATE FUNCTION ops.runs_before_insert() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF jsonb_typeof(NEW.metadata) IS DISTINCT FROM 'object' THEN
        RAISE EXCEPTION 'run metadata must be a JSON object, not %', NEW.metadata
            USING ERRCODE = '22023';
    END IF;
    IF NEW.metadata ? 'workflow' THEN
        IF jsonb_typeof(NEW.metadata->'workflow') <> 'string' THEN
            RAISE EXCEPTION 'metadata.workflow must be a string naming the workflow, not %',
                NEW.metadata->'workflow' USING ERRCODE = '22023';
        END IF;
        NEW.workflow := NEW.metadata->>'workflow';
    END IF;
    SELECT w.max_attempts INTO NEW.max_attempts FROM ops.workflows w
     WHERE w.workflow = NEW.workflow;
    NEW.max_attempts := coalesce(NEW.max_attempts, 1);
    RETURN NEW;
END;
$$;

CREATE TRIGGER runs_before_insert BEFORE INSERT ON ops.runs
    FOR EACH ROW EXECUTE FUNCTION ops.runs_before_insert();

-- Wakes listening agents. The payload is the environment so an agent can ignore runs it
-- does not serve; identical payloads within one transaction are delivered once.
CREATE FUNCTION ops.runs_notify_queued() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('ops_run_queued', NEW.env_id);
    RETURN NULL;
END;
$$;

CREATE TRIGGER runs_notify_queued_insert AFTER INSERT ON ops.runs
    FOR EACH ROW WHEN (NEW.status = 'queued') EXECUTE FUNCTION ops.runs_notify_queued();
CREATE TRIGGER runs_notify_queued_update AFTER UPDATE OF status ON ops.runs
    FOR EACH ROW WHEN (NEW.status = 'queued' AND OLD.status IS DISTINCT FROM 'queued')
    EXECUTE FUNCTION ops.runs_notify_queued();

-- Resolves p_env, which callers pass either as an environment id ('env-prod') or as an
-- environment type ('staging') of the project.
CREATE FUNCTION ops.resolve_env(p_project_id text, p_env text) RETURNS text
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_env_id text;
    v_count integer;
BEGIN
    SELECT e.env_id INTO v_env_id FROM ops.environments e
     WHERE e.env_id = p_env AND e.project_id = p_project_id;
    IF FOUND THEN
        RETURN v_env_id;
    END IF;

    SELECT min(e.env_id), count(*) INTO v_env_id, v_count FROM ops.environments e
     WHERE e.project_id = p_project_id AND e.env_type = p_env;
    IF v_count = 1 THEN
        RETURN v_env_id;
    ELSIF v_count > 1 THEN
        RAISE EXCEPTION 'project % has % environments of type %; pass an env_id',
            p_project_id, v_count, p_env USING ERRCODE = '22023';
    END IF;
    RAISE EXCEPTION 'project % has no environment with id or type %', p_project_id, p_env
        USING ERRCODE = '22023';
END;
$$;

CREATE FUNCTION ops.queue_run(
    p_project_id text,
    p_env text,
    p_git_sha text DEFAULT NULL,
    p_git_ref text DEFAULT NULL,
    p_metadata jsonb DEFAULT '{}'
) RETURNS SETOF ops.runs
LANGUAGE sql AS $$
    INSERT INTO ops.runs (project_id, env_id, git_sha, git_ref, metadata)
    VALUES (p_project_id, ops.resolve_env(p_project_id, p_env), p_git_sha, p_git_ref,
            coalesce(p_metadata, '{}'))
    RETURNING *;
$$;

-- A lease of NULL or zero seconds would never expire or expire at once.
CREATE FUNCTION ops.check_lease_seconds(p_lease_seconds integer) RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF p_lease_seconds IS NULL OR p_lease_seconds < 1 THEN
        RAISE EXCEPTION 'p_lease_seconds must be a positive number of seconds, not %',
            coalesce(p_lease_seconds::text, 'NULL') USING ERRCODE = '22023';
    END IF;
END;
$$;

-- Claims the oldest claimable run, or returns no row.
--
-- The row lock taken by FOR UPDATE SKIP LOCKED lives only for this statement's
-- transaction, a few milliseconds: concurrent claimers skip the locked row instead of
-- waiting, so no two callers get the same run. What protects the run afterwards is the
-- lease: lease_token identifies this claim, and if the agent dies without renewing it by
-- lease_expires_at, ops.reap_expired_runs() requeues or fails the run.
--
-- p_env_ids and p_workflows narrow the claim to what the caller serves (NULL means any).
-- Runs of unknown workflows are always claimable within the environments, so that they
-- are failed with an event instead of waiting forever.
--
-- Agents pass p_lease_seconds and renew the lease with ops.heartbeat_run. The default of
-- an hour is for callers that claim with p_worker_id alone and never renew, such as a CI
-- job that builds for many minutes and then calls finish_run: a shorter lease would have
-- the run reaped and executed a second time while the job is still working on it.
-- PL/pgSQL rather than SQL: a SQL function whose body modifies data is never inlined, and
-- PostgreSQL 15 plans its body again on every call, which cost about as much as running
-- it. PL/pgSQL keeps the plan for the rest of the session.
CREATE FUNCTION ops.claim_next_run(
    p_worker_id text,
    p_env_ids text[] DEFAULT NULL,
    p_workflows text[] DEFAULT NULL,
    p_lease_seconds integer DEFAULT 3600
) RETURNS SETOF ops.runs
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM ops.check_lease_seconds(p_lease_seconds);
    RETURN QUERY
    WITH next AS (
        SELECT r.run_id
          FROM ops.runs r
         WHERE r.status = 'queued'
           AND r.run_after <= now()
           AND (p_env_ids IS NULL OR r.env_id = ANY (p_env_ids))
           AND (p_workflows IS NULL
                OR r.workflow = ANY (p_workflows)
                OR NOT EXISTS (SELECT 1 FROM ops.workflows w WHERE w.workflow = r.workflow))
         ORDER BY r.created_at
         LIMIT 1
           FOR UPDATE SKIP LOCKED
    )
    UPDATE ops.runs r
       SET status = 'running',
           worker_id = p_worker_id,
           attempt = r.attempt + 1,
           lease_token = gen_random_uuid(),
           lease_expires_at = now() + make_interval(secs => p_lease_seconds),
           heartbeat_at = now(),
           started_at = coalesce(r.started_at, now())
      FROM next
     WHERE r.run_id = next.run_id
    RETURNING r.*;
END;
$$;

-- Appends one event with the next seq of the run. The row lock on the run orders
-- concurrent writers.
CREATE FUNCTION ops.append_event(
    p_run_id uuid,
    p_level text,
    p_message text,
    p_payload jsonb DEFAULT NULL
) RETURNS SETOF ops.run_events
LANGUAGE plpgsql AS $$
DECLARE
    v_seq bigint;
    v_level text := lower(p_level);
BEGIN
    IF v_level = 'warning' THEN
        v_level := 'warn';
    END IF;
    IF v_level IS NULL OR v_level NOT IN ('debug', 'info', 'warn', 'error') THEN
        RAISE EXCEPTION 'invalid event level %: expected debug, info, warn or error',
            coalesce(p_level, 'NULL') USING ERRCODE = '22023';
    END IF;
    UPDATE ops.runs SET event_seq = event_seq + 1 WHERE run_id = p_run_id
    RETURNING event_seq INTO v_seq;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'run % does not exist', p_run_id USING ERRCODE = 'OPN01';
    END IF;
    RETURN QUERY
        INSERT INTO ops.run_events (run_id, seq, level, message, payload)
        VALUES (p_run_id, v_seq, v_level, p_message, p_payload)
        RETURNING *;
END;
$$;

-- Appends a batch of events for a run the caller holds the lease of, in one statement.
-- Returns the number of rows written: 0 when this p_batch_id was already written (a retry
-- after the connection died during commit). Raises OPL01 when the lease is gone.
CREATE FUNCTION ops.append_events(
    p_run_id uuid,
    p_lease_token uuid,
    p_batch_id uuid,
    p_levels text[],
    p_messages text[],
    p_payloads jsonb[],
    p_created_at timestamptz[]
) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_base bigint;
    v_last_batch uuid;
    v_count integer := cardinality(p_messages);
BEGIN
    SELECT event_seq, last_event_batch INTO v_base, v_last_batch
      FROM ops.runs
     WHERE run_id = p_run_id AND lease_token = p_lease_token AND status = 'running'
       FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'lease on run % is no longer held by this worker', p_run_id
            USING ERRCODE = 'OPL01';
    END IF;
    IF v_last_batch = p_batch_id THEN
        RETURN 0;
    END IF;

    INSERT INTO ops.run_events (run_id, seq, level, message, payload, created_at)
    SELECT p_run_id, v_base + e.ord, e.level, e.message, e.payload, e.created_at
      FROM unnest(p_levels, p_messages, p_payloads, p_created_at)
           WITH ORDINALITY AS e(level, message, payload, created_at, ord);

    UPDATE ops.runs SET event_seq = v_base + v_count, last_event_batch = p_batch_id
     WHERE run_id = p_run_id;
    RETURN v_count;
END;
$$;

-- Renews a lease. Returns whether cancellation of the run was requested; raises OPL01
-- when the caller no longer holds the lease.
CREATE FUNCTION ops.heartbeat_run(
    p_run_id uuid,
    p_lease_token uuid,
    p_lease_seconds integer DEFAULT 60
) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    v_cancel boolean;
BEGIN
    PERFORM ops.check_lease_seconds(p_lease_seconds);
    UPDATE ops.runs
       SET lease_expires_at = now() + make_interval(secs => p_lease_seconds),
           heartbeat_at = now()
     WHERE run_id = p_run_id AND lease_token = p_lease_token AND status = 'running'
    RETURNING cancel_requested_at IS NOT NULL INTO v_cancel;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'lease on run % is no longer held by this worker', p_run_id
            USING ERRCODE = 'OPL01';
    END IF;
    RETURN v_cancel;
END;
$$;

-- Ends a run and merges p_metadata into its metadata. With p_lease_token, the caller must
-- hold the run's lease (agents); without it (CI jobs, the console), a run that has not
-- finished is finished as asked. A finished run is never finished again.
--
-- The common case is one UPDATE; the run is read again only to say why nothing matched.
CREATE FUNCTION ops.finish_run(
    p_run_id uuid,
    p_status text,
    p_metadata jsonb DEFAULT '{}',
    p_lease_token uuid DEFAULT NULL
) RETURNS SETOF ops.runs
LANGUAGE plpgsql AS $$
DECLARE
    v_status text;
BEGIN
    IF p_status IS NULL OR p_status NOT IN ('success', 'failed', 'cancelled') THEN
        RAISE EXCEPTION 'invalid final status %: expected success, failed or cancelled',
            coalesce(p_status, 'NULL') USING ERRCODE = '22023';
    END IF;
    IF p_metadata IS NOT NULL AND jsonb_typeof(p_metadata) <> 'object' THEN
        RAISE EXCEPTION 'p_metadata must be a JSON object, not %', p_metadata
            USING ERRCODE = '22023';
    END IF;

    RETURN QUERY
        UPDATE ops.runs r
           SET status = p_status,
               finished_at = now(),
               metadata = r.metadata || coalesce(p_metadata, '{}'),
               lease_token = NULL,
               lease_expires_at = NULL
         WHERE r.run_id = p_run_id
           AND r.status NOT IN ('success', 'failed', 'cancelled')
           AND (p_lease_token IS NULL
                OR (r.status = 'running' AND r.lease_token = p_lease_token))
        RETURNING r.*;
    IF FOUND THEN
        RETURN;
    END IF;

    SELECT r.status INTO v_status FROM ops.runs r WHERE r.run_id = p_run_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'run % does not exist', p_run_id USING ERRCODE = 'OPN01';
    END IF;
    IF p_lease_token IS NOT NULL THEN
        RAISE EXCEPTION 'lease on run % is no longer held by this worker', p_run_id
            USING ERRCODE = 'OPL01';
    END IF;
    RAISE EXCEPTION 'run % already finished with status %', p_run_id, v_status
        USING ERRCODE = '55000';
END;
$$;

-- Hands a run back to the queue without counting the attempt, for an agent that is
-- shutting down before the run could finish.
CREATE FUNCTION ops.release_run(
    p_run_id uuid,
    p_lease_token uuid,
    p_reason text
) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE ops.runs
       SET status = 'queued',
           attempt = greatest(attempt - 1, 0),
           worker_id = NULL,
           lease_token = NULL,
           lease_expires_at = NULL,
           run_after = now()
     WHERE run_id = p_run_id AND lease_token = p_lease_token AND status = 'running';
    IF NOT FOUND THEN
        RAISE EXCEPTION 'lease on run % is no longer held by this worker', p_run_id
            USING ERRCODE = 'OPL01';
    END IF;
    PERFORM ops.append_event(p_run_id, 'warn', 'Run handed back to the queue: ' || p_reason);
END;
$$;

-- Requests cancellation. A run that has not started is cancelled at once; a running one
-- is flagged, and its agent stops it at the next heartbeat and finishes it 'cancelled'.
CREATE FUNCTION ops.cancel_run(p_run_id uuid, p_reason text DEFAULT 'cancelled by request')
RETURNS SETOF ops.runs
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE ops.runs
       SET status = 'cancelled', finished_at = now(),
           metadata = metadata || jsonb_build_object('error', p_reason)
     WHERE run_id = p_run_id AND status IN ('queued', 'pending_approval');
    IF NOT FOUND THEN
        UPDATE ops.runs SET cancel_requested_at = coalesce(cancel_requested_at, now())
         WHERE run_id = p_run_id AND status = 'running';
    END IF;
    PERFORM ops.append_event(p_run_id, 'warn', 'Cancellation requested: ' || p_reason);
    RETURN QUERY SELECT * FROM ops.runs WHERE run_id = p_run_id;
END;
$$;

-- Takes back runs whose lease expired: their agent died, lost its network or hung.
-- Each is requeued after its workflow's retry delay while attempts remain, failed on its
-- last attempt, and cancelled if cancellation was requested; an event says which and why.
-- SKIP LOCKED lets every agent call this on a timer without waiting on each other.
CREATE FUNCTION ops.reap_expired_runs(p_limit integer DEFAULT 100)
RETURNS TABLE (run_id uuid, worker_id text, action text)
LANGUAGE plpgsql AS $$
DECLARE
    v_run record;
    v_delay interval;
BEGIN
    FOR v_run IN
        SELECT r.run_id, r.worker_id, r.attempt, r.max_attempts, r.workflow,
               r.lease_expires_at, r.cancel_requested_at
          FROM ops.runs r
         WHERE r.status = 'running' AND r.lease_expires_at < now()
         ORDER BY r.lease_expires_at
         LIMIT p_limit
           FOR UPDATE SKIP LOCKED
    LOOP
        run_id := v_run.run_id;
        worker_id := v_run.worker_id;
        IF v_run.cancel_requested_at IS NOT NULL THEN
            -- Retrying a run whose cancellation was requested would only cancel it later.
            UPDATE ops.runs r
               SET status = 'cancelled', finished_at = now(), lease_token = NULL,
                   lease_expires_at = NULL,
                   metadata = r.metadata || jsonb_build_object('error', format(
                       'lease of worker %s expired after cancellation was requested',
                       v_run.worker_id))
             WHERE r.run_id = v_run.run_id;
            action := 'cancelled';
            PERFORM ops.append_event(v_run.run_id, 'warn', format(
                'Lease of worker %s expired at %s after cancellation was requested; '
                'run cancelled', v_run.worker_id, v_run.lease_expires_at),
                jsonb_build_object('worker_id', v_run.worker_id, 'attempt', v_run.attempt));
        ELSIF v_run.attempt < v_run.max_attempts THEN
            SELECT w.retry_delay INTO v_delay FROM ops.workflows w
             WHERE w.workflow = v_run.workflow;
            UPDATE ops.runs r
               SET status = 'queued', worker_id = NULL, lease_token = NULL,
                   lease_expires_at = NULL,
                   run_after = now() + coalesce(v_delay, interval '5 seconds')
             WHERE r.run_id = v_run.run_id;
            action := 'requeued';
            PERFORM ops.append_event(v_run.run_id, 'warn', format(
                'Lease of worker %s expired at %s; run requeued for attempt %s of %s',
                v_run.worker_id, v_run.lease_expires_at, v_run.attempt + 1,
                v_run.max_attempts),
                jsonb_build_object('worker_id', v_run.worker_id, 'attempt', v_run.attempt));
        ELSE
            UPDATE ops.runs r
               SET status = 'failed', finished_at = now(), lease_token = NULL,
                   lease_expires_at = NULL,
                   metadata = r.metadata || jsonb_build_object('error', format(
                       'lease of worker %s expired on the last attempt', v_run.worker_id))
             WHERE r.run_id = v_run.run_id;
            action := 'failed';
            PERFORM ops.append_event(v_run.run_id, 'error', format(
                'Lease of worker %s expired at %s on attempt %s of %s; run failed',
                v_run.worker_id, v_run.lease_expires_at, v_run.attempt,
                v_run.max_attempts),
                jsonb_build_object('worker_id', v_run.worker_id, 'attempt', v_run.attempt));
        END IF;
        RETURN NEXT;
    END LOOP;
END;
$$;

-- Records an artifact of a run. With p_lease_token, the caller must hold the run's lease.
CREATE FUNCTION ops.add_artifact(
    p_run_id uuid,
    p_artifact_type text,
    p_storage_path text,
    p_digest text DEFAULT NULL,
    p_size_bytes bigint DEFAULT NULL,
    p_metadata jsonb DEFAULT '{}',
    p_lease_token uuid DEFAULT NULL
) RETURNS SETOF ops.artifacts
LANGUAGE plpgsql AS $$
BEGIN
    IF p_lease_token IS NOT NULL THEN
        PERFORM 1 FROM ops.runs
          WHERE run_id = p_run_id AND lease_token = p_lease_token AND status = 'running'
            FOR SHARE;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'lease on run % is no longer held by this worker', p_run_id
                USING ERRCODE = 'OPL01';
        END IF;
    END IF;
    RETURN QUERY
        INSERT INTO ops.artifacts (run_id, artifact_type, storage_path, digest, size_bytes,
                                   metadata)
        VALUES (p_run_id, p_artifact_type, p_storage_path, p_digest, p_size_bytes,
                coalesce(p_metadata, '{}'))
        RETURNING *;
END;
$$;

-- Records a backup and queues the run that performs it on the agent hosting p_env.
CREATE FUNCTION ops.create_backup(
    p_project_id text,
    p_env text,
    p_backup_type text DEFAULT 'manual',
    p_metadata jsonb DEFAULT '{}'
) RETURNS SETOF ops.backups
LANGUAGE plpgsql AS $$
DECLARE
    v_env_id text := ops.resolve_env(p_project_id, p_env);
    v_backup_id uuid := gen_random_uuid();
    v_run_id uuid;
BEGIN
    INSERT INTO ops.runs (project_id, env_id, metadata)
    VALUES (p_project_id, v_env_id, coalesce(p_metadata, '{}') || jsonb_build_object(
        'workflow', 'backup', 'backup_id', v_backup_id, 'backup_type', p_backup_type))
    RETURNING ops.runs.run_id INTO v_run_id;

    RETURN QUERY
        INSERT INTO ops.backups (backup_id, project_id, env_id, run_id, backup_type, metadata)
        VALUES (v_backup_id, p_project_id, v_env_id, v_run_id, p_backup_type,
                coalesce(p_metadata, '{}'))
        RETURNING *;
END;
$$;

-- Edge Function cron (daily at 3 AM)
CREATE OR REPLACE FUNCTION ops.cleanup_expired_artifacts()
RETURNS void AS $$
BEGIN
    -- Delete artifact metadata for expired artifacts
    DELETE FROM ops.artifacts
    WHERE created_at < NOW() - INTERVAL '90 days'
      AND artifact_type IN ('sbom', 'logs', 'evidence', 'manifest');

    -- Mark old runs for archival
    UPDATE ops.runs
    SET metadata = metadata || '{"archived": true}'::jsonb
    WHERE created_at < NOW() - INTERVAL '90 days'
      AND status IN ('success', 'failed', 'cancelled');
END;
$$ LANGUAGE plpgsql;
