-- Approvals that the database enforces, and the branch rules that choose where a build is
-- deployed.
--
-- A run of a workflow that requires approval (deploy and promote), queued for an
-- environment with required_reviewers > 0, is inserted as 'pending_approval' instead of
-- 'queued', with one pending ops.approvals row per required reviewer. claim_next_run only
-- claims 'queued' runs, so no agent can take the run until enough distinct reviewers,
-- none of them its requester, have approved it. One rejection cancels it.

-- Reviewers a deploy or promotion to the environment needs. An insert that leaves it NULL
-- gets 2 for prod and 0 otherwise (see environments_default_reviewers).
ALTER TABLE ops.environments ADD COLUMN required_reviewers integer
    CHECK (required_reviewers BETWEEN 0 AND 20);
UPDATE ops.environments
   SET required_reviewers = CASE WHEN env_type = 'prod' THEN 2 ELSE 0 END;
ALTER TABLE ops.environments ALTER COLUMN required_reviewers SET NOT NULL;

CREATE FUNCTION ops.environments_default_reviewers() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.required_reviewers IS NULL THEN
        NEW.required_reviewers := CASE WHEN NEW.env_type = 'prod' THEN 2 ELSE 0 END;
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER environments_default_reviewers BEFORE INSERT ON ops.environments
    FOR EACH ROW EXECUTE FUNCTION ops.environments_default_reviewers();

-- Whether runs of the workflow wait for approval in environments that require reviewers.
-- Rollbacks do not: they restore a version that was approved before, and waiting for
-- reviewers would keep a broken site down.
ALTER TABLE ops.workflows ADD COLUMN requires_approval boolean NOT NULL DEFAULT false;
UPDATE ops.workflows SET requires_approval = true WHERE workflow IN ('deploy', 'promote');

-- One decision per reviewer and run, whatever the letter case of the login.
CREATE UNIQUE INDEX approvals_one_per_reviewer ON ops.approvals (run_id, lower(approved_by))
    WHERE approved_by IS NOT NULL;

-- The person who requested a run: metadata.triggered_by, or for the promotion call that
-- names its GitHub actor in approved_by, that value.
CREATE FUNCTION ops.run_requester(p_metadata jsonb) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT nullif(trim(coalesce(p_metadata->>'triggered_by', p_metadata->>'approved_by')), '');
$$;

-- Reviewers a run needs: 0 unless its workflow requires approval.
CREATE FUNCTION ops.run_required_reviewers(p_env_id text, p_workflow text) RETURNS integer
LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN coalesce(w.requires_approval, false) THEN e.required_reviewers ELSE 0 END
      FROM ops.environments e
      LEFT JOIN ops.workflows w ON w.workflow = p_workflow
     WHERE e.env_id = p_env_id;
$$;

-- Distinct reviewers other than the requester who approved the run.
CREATE FUNCTION ops.run_approvers(p_run_id uuid) RETURNS text[]
LANGUAGE sql STABLE AS $$
    SELECT coalesce(array_agg(DISTINCT a.approved_by ORDER BY a.approved_by), '{}')
      FROM ops.approvals a
      JOIN ops.runs r ON r.run_id = a.run_id
     WHERE a.run_id = p_run_id
       AND a.status = 'approved'
       AND lower(a.approved_by) IS DISTINCT FROM lower(ops.run_requester(r.metadata));
$$;

-- Holds a new run that needs approval. It runs after runs_before_insert (triggers fire in
-- name order), which has set NEW.workflow. A run inserted as 'running' is held too,
-- because the reaper would requeue it once its lease expired.
CREATE FUNCTION ops.runs_require_approval() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status NOT IN ('queued', 'running')
       OR coalesce(ops.run_required_reviewers(NEW.env_id, NEW.workflow), 0) = 0 THEN
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

CREATE TRIGGER runs_require_approval BEFORE INSERT ON ops.runs
    FOR EACH ROW EXECUTE FUNCTION ops.runs_require_approval();

-- Opens one pending approval per required reviewer, for reviewers or a webhook to fill in.
CREATE FUNCTION ops.runs_open_approvals() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_required integer := ops.run_required_reviewers(NEW.env_id, NEW.workflow);
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

CREATE TRIGGER runs_open_approvals AFTER INSERT ON ops.runs
    FOR EACH ROW WHEN (NEW.status = 'pending_approval')
    EXECUTE FUNCTION ops.runs_open_approvals();

-- Keeps a held run from leaving 'pending_approval' for anything but 'cancelled' until it
-- has its approvals, whoever updates it: the console, finish_run or a hand-written UPDATE.
CREATE FUNCTION ops.runs_guard_approval() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_required integer := coalesce(ops.run_required_reviewers(NEW.env_id, NEW.workflow), 0);
    v_approvers text[] := ops.run_approvers(NEW.run_id);
BEGIN
    IF cardinality(v_approvers) < v_required THEN
        RAISE EXCEPTION 'run % is waiting for approval: % of % reviewers approved it',
            NEW.run_id, cardinality(v_approvers), v_required USING ERRCODE = '55000';
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER runs_guard_approval BEFORE UPDATE OF status ON ops.runs
    FOR EACH ROW
    WHEN (OLD.status = 'pending_approval'
          AND NEW.status NOT IN ('pending_approval', 'cancelled'))
    EXECUTE FUNCTION ops.runs_guard_approval();

-- Checks a decision before it is stored. The run's row lock serializes decisions on one
-- run, so two approvals committed at the same moment are both counted by the second.
CREATE FUNCTION ops.approvals_check_decision() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_run ops.runs;
    v_requester text;
BEGIN
    IF NEW.run_id IS NULL THEN
        RAISE EXCEPTION 'an approval must name its run' USING ERRCODE = '23502';
    END IF;
    SELECT * INTO v_run FROM ops.runs WHERE run_id = NEW.run_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'run % does not exist', NEW.run_id USING ERRCODE = 'OPN01';
    END IF;
    IF NEW.status = 'pending' THEN
        RETURN NEW;
    END IF;
    IF v_run.status <> 'pending_approval' THEN
        RAISE EXCEPTION 'run % is not waiting for approval (status %)', NEW.run_id,
            v_run.status USING ERRCODE = '55000';
    END IF;

    NEW.approved_by := nullif(trim(NEW.approved_by), '');
    IF NEW.approved_by IS NULL THEN
        RAISE EXCEPTION 'an % approval must name the reviewer in approved_by', NEW.status
            USING ERRCODE = '23502';
    END IF;
    v_requester := ops.run_requester(v_run.metadata);
    IF lower(NEW.approved_by) = lower(v_requester) THEN
        RAISE EXCEPTION '% requested run % and cannot review it', NEW.approved_by,
            NEW.run_id USING ERRCODE = '42501';
    END IF;
    IF EXISTS (SELECT 1 FROM ops.approvals a
                WHERE a.run_id = NEW.run_id AND a.approval_id <> NEW.approval_id
                  AND lower(a.approved_by) = lower(NEW.approved_by)) THEN
        RAISE EXCEPTION '% already reviewed run %', NEW.approved_by, NEW.run_id
            USING ERRCODE = '23505';
    END IF;
    NEW.approved_at := coalesce(NEW.approved_at, now());
    RETURN NEW;
END;
$$;

CREATE TRIGGER approvals_check_decision BEFORE INSERT OR UPDATE ON ops.approvals
    FOR EACH ROW EXECUTE FUNCTION ops.approvals_check_decision();

-- Acts on a decision: a rejection cancels the run, and the last approval it needed queues
-- it, which wakes the agents through runs_notify_queued_update.
CREATE FUNCTION ops.approvals_apply_decision() RETURNS trigger
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

    v_required := ops.run_required_reviewers(v_run.env_id, v_run.workflow);
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

CREATE TRIGGER approvals_apply_decision AFTER INSERT OR UPDATE ON ops.approvals
    FOR EACH ROW WHEN (NEW.status <> 'pending')
    EXECUTE FUNCTION ops.approvals_apply_decision();

-- Records a reviewer's decision on a run: fills one of its pending approval rows, or adds
-- a row when none is left. p_decision is 'approved' or 'rejected'.
CREATE FUNCTION ops.review_run(
    p_run_id uuid,
    p_reviewer text,
    p_decision text DEFAULT 'approved',
    p_comment text DEFAULT NULL
) RETURNS SETOF ops.approvals
LANGUAGE plpgsql AS $$
DECLARE
    v_approval_id uuid;
    v_metadata jsonb := CASE WHEN p_comment IS NULL THEN '{}'
                             ELSE jsonb_build_object('comment', p_comment) END;
BEGIN
    IF p_decision NOT IN ('approved', 'rejected') THEN
        RAISE EXCEPTION 'invalid decision %: expected approved or rejected', p_decision
            USING ERRCODE = '22023';
    END IF;
    -- Lock the run first, as the approval triggers do, so that two reviewers never pick
    -- the same pending row.
    PERFORM 1 FROM ops.runs WHERE run_id = p_run_id FOR UPDATE;
    SELECT a.approval_id INTO v_approval_id FROM ops.approvals a
     WHERE a.run_id = p_run_id AND a.status = 'pending'
     ORDER BY a.created_at, a.approval_id
     LIMIT 1;
    IF FOUND THEN
        RETURN QUERY
            UPDATE ops.approvals
               SET status = p_decision, approved_by = p_reviewer, approved_at = now(),
                   metadata = metadata || v_metadata
             WHERE approval_id = v_approval_id
            RETURNING *;
    ELSE
        RETURN QUERY
            INSERT INTO ops.approvals (run_id, status, approved_by, approved_at, metadata)
            VALUES (p_run_id, p_decision, p_reviewer, now(), v_metadata)
            RETURNING *;
    END IF;
END;
$$;

-- Branch rules: where a successful build of a branch is deployed. Rules with a NULL
-- project_id apply to every project that has no rules of its own. The first rule by
-- position whose pattern matches the branch wins; env_target is an environment id or
-- type of the project, and NULL means "do not deploy".
CREATE TABLE ops.branch_rules (
    rule_id     uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    project_id  text        REFERENCES ops.projects ON DELETE CASCADE,
    position    integer     NOT NULL,
    -- A glob over the branch name: * matches within one path segment, ** across
    -- segments, ? one character other than /.
    pattern     text        NOT NULL CHECK (pattern <> ''),
    env_target  text,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE UNIQUE INDEX branch_rules_order ON ops.branch_rules (coalesce(project_id, ''), position);

INSERT INTO ops.branch_rules (project_id, position, pattern, env_target) VALUES
    (NULL, 10, 'main', 'staging'),
    (NULL, 20, 'release/**', 'prod'),
    (NULL, 30, '**', 'dev');

-- Translates a branch glob into an anchored POSIX regular expression.
CREATE FUNCTION ops.glob_to_regex(p_glob text) RETURNS text
LANGUAGE plpgsql IMMUTABLE STRICT AS $$
DECLARE
    v_out text := '^';
    v_char text;
    v_i integer := 1;
BEGIN
    WHILE v_i <= length(p_glob) LOOP
        v_char := substr(p_glob, v_i, 1);
        IF v_char = '*' AND substr(p_glob, v_i + 1, 1) = '*' THEN
            v_out := v_out || '.*';
            v_i := v_i + 1;
        ELSIF v_char = '*' THEN
            v_out := v_out || '[^/]*';
        ELSIF v_char = '?' THEN
            v_out := v_out || '[^/]';
        ELSIF strpos('.^$+(){}[]|\', v_char) > 0 THEN
            v_out := v_out || '\' || v_char;
        ELSE
            v_out := v_out || v_char;
        END IF;
        v_i := v_i + 1;
    END LOOP;
    RETURN v_out || '$';
END;
$$;

-- Returns the environment id that a successful build of p_git_ref deploys to, or NULL
-- when no rule matches, the matching rule says not to deploy, or the project has no such
-- environment. p_git_ref may be a branch name or a full ref (refs/heads/main).
CREATE FUNCTION ops.branch_deploy_env(p_project_id text, p_git_ref text) RETURNS text
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_branch text := regexp_replace(p_git_ref, '^refs/heads/', '');
    v_target text;
    v_env_id text;
BEGIN
    SELECT r.env_target INTO v_target
      FROM ops.branch_rules r
     WHERE (r.project_id = p_project_id
            OR (r.project_id IS NULL AND NOT EXISTS (
                SELECT 1 FROM ops.branch_rules own WHERE own.project_id = p_project_id)))
       AND v_branch ~ ops.glob_to_regex(r.pattern)
     ORDER BY r.position
     LIMIT 1;
    IF v_target IS NULL THEN
        RETURN NULL;
    END IF;
    SELECT e.env_id INTO v_env_id FROM ops.environments e
     WHERE e.project_id = p_project_id AND (e.env_id = v_target OR e.env_type = v_target)
     ORDER BY e.env_id = v_target DESC, e.env_id
     LIMIT 1;
    RETURN v_env_id;
END;
$$;
