-- Approval for restores that replace an environment's live database.
--
-- A 'restore' run with overwrite set and target_db equal to the environment's db_name
-- replaces the database (and filestore) that the environment's Odoo serves. Such a run
-- needs the same approvals as a deploy to that environment: it is held in
-- 'pending_approval' until required_reviewers reviewers other than its requester approve
-- it. Restores into any other database need no approval.
--
-- The approval triggers of migration 2 are replaced by versions that pass the run's
-- metadata to the three-argument ops.run_required_reviewers below. Their names,
-- signatures and behaviour for every other run stay the same.

-- Whether run metadata asks a restore to replace the live database of the environment:
-- overwrite is anything but false or absent, and target_db is the environment's db_name.
-- Only the run's own environment is compared: which environments share a PostgreSQL
-- server is known to the agent's config, not here. The agent rejects a restore whose
-- target_db is the live database of another environment on the same server.
CREATE FUNCTION ops.restore_replaces_live_db(p_env_id text, p_metadata jsonb)
RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT coalesce(bool_or(
               coalesce(p_metadata->'overwrite', 'null') NOT IN ('false', 'null')
               AND p_metadata->>'target_db' = e.db_name), false)
      FROM ops.environments e
     WHERE e.env_id = p_env_id;
$$;

-- Reviewers a run with this metadata needs: those of its workflow, or the environment's
-- required_reviewers for a restore that replaces the environment's live database.
CREATE FUNCTION ops.run_required_reviewers(p_env_id text, p_workflow text, p_metadata jsonb)
RETURNS integer
LANGUAGE sql STABLE AS $$
    SELECT CASE
               WHEN p_workflow = 'restore'
                    AND ops.restore_replaces_live_db(p_env_id, p_metadata)
               THEN e.required_reviewers
               ELSE ops.run_required_reviewers(p_env_id, p_workflow)
           END
      FROM ops.environments e
     WHERE e.env_id = p_env_id;
$$;

CREATE OR REPLACE FUNCTION ops.runs_require_approval() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status NOT IN ('queued', 'running')
       OR coalesce(ops.run_required_reviewers(NEW.env_id, NEW.workflow, NEW.metadata), 0)
          = 0 THEN
        RETURN NEW;
    END IF;
    IF ops.run_requester(NEW.metadata) IS NULL THEN
        RAISE EXCEPTION 'a % run for % needs approval: name its requester in triggered_by',
            NEW.workflow, NEW.env_id USING ERRCODE = '22023';
    END IF;
    NEW.status := 'pending_approval';
    NEW.worker_id := NULL;
    NEW.lease_token := NULL;
    NEW.lease_expires_at := NULL;
    RETURN NEW;
END;
$$;

CREATE OR REPLACE FUNCTION ops.runs_open_approvals() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_required integer := ops.run_required_reviewers(NEW.env_id, NEW.workflow, NEW.metadata);
BEGIN
    INSERT INTO ops.approvals (run_id, metadata)
    SELECT NEW.run_id, jsonb_build_object('reviewer_slot', slot)
      FROM generate_series(1, v_required) AS slot;
    PERFORM ops.append_event(NEW.run_id, 'info', format(
        'Waiting for approval by %s reviewers other than the requester %s',
        v_required, ops.run_requester(NEW.metadata)),
        jsonb_build_object('required_reviewers', v_required,
                           'requester', ops.run_requester(NEW.metadata)));
    RETURN NULL;
END;
$$;

CREATE OR REPLACE FUNCTION ops.runs_guard_approval() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_required integer :=
        coalesce(ops.run_required_reviewers(NEW.env_id, NEW.workflow, NEW.metadata), 0);
    v_approvers text[] := ops.run_approvers(NEW.run_id);
BEGIN
    IF cardinality(v_approvers) < v_required THEN
        RAISE EXCEPTION 'run % is waiting for approval: % of % reviewers approved it',
            NEW.run_id, cardinality(v_approvers), v_required USING ERRCODE = '55000';
    END IF;
    RETURN NEW;
END;
$$;

CREATE OR REPLACE FUNCTION ops.approvals_apply_decision() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_run ops.runs;
    v_required integer;
    v_approvers text[];
BEGIN
    SELECT * INTO v_run FROM ops.runs WHERE run_id = NEW.run_id;
    IF v_run.status <> 'pending_approval' THEN
        RETURN NULL;
    END IF;

    IF NEW.status = 'rejected' THEN
        UPDATE ops.runs
           SET status = 'cancelled', finished_at = now(),
               metadata = metadata || jsonb_build_object(
                   'error', format('rejected by %s', NEW.approved_by),
                   'rejected_by', NEW.approved_by)
         WHERE run_id = NEW.run_id;
        PERFORM ops.append_event(NEW.run_id, 'warn',
            format('Rejected by %s; run cancelled', NEW.approved_by),
            jsonb_build_object('rejected_by', NEW.approved_by));
        RETURN NULL;
    END IF;

    v_required := ops.run_required_reviewers(v_run.env_id, v_run.workflow, v_run.metadata);
    v_approvers := ops.run_approvers(NEW.run_id);
    IF NEW.status = 'approved' THEN
        PERFORM ops.append_event(NEW.run_id, 'info', format('Approved by %s (%s of %s)',
            NEW.approved_by, cardinality(v_approvers), v_required),
            jsonb_build_object('approved_by', NEW.approved_by));
    END IF;
    IF cardinality(v_approvers) >= v_required THEN
        UPDATE ops.runs
           SET status = 'queued', run_after = now(),
               metadata = metadata || jsonb_build_object('approvers', to_jsonb(v_approvers))
         WHERE run_id = NEW.run_id;
        PERFORM ops.append_event(NEW.run_id, 'info', 'Approved; run queued',
            jsonb_build_object('approvers', to_jsonb(v_approvers)));
    END IF;
    RETURN NULL;
END;
$$;
