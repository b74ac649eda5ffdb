-- A few tables shaped like Odoo's, for the demo's backup and restore: installed modules,
-- attachments whose files live in the filestore, scheduled actions and a mail server,
-- which a restore outside production must switch off.
CREATE TABLE ir_module_module (id serial PRIMARY KEY, name varchar NOT NULL,
    state varchar, latest_version varchar);
INSERT INTO ir_module_module (name, state, latest_version) VALUES
    ('base', 'installed', '17.0.1.3'), ('web', 'installed', '17.0.1.0'),
    ('odooops_sample', 'installed', '17.0.1.0');
CREATE TABLE ir_attachment (id serial PRIMARY KEY, name varchar NOT NULL,
    store_fname varchar, file_size integer, mimetype varchar, db_datas bytea);
CREATE TABLE ir_cron (id serial PRIMARY KEY, cron_name varchar, active boolean);
INSERT INTO ir_cron (cron_name, active) VALUES
    ('Mail: Email Queue Manager', true), ('Base: Auto-vacuum internal data', true);
CREATE TABLE ir_mail_server (id serial PRIMARY KEY, name varchar, smtp_host varchar,
    active boolean);
INSERT INTO ir_mail_server (name, smtp_host, active)
    VALUES ('Outgoing mail', 'smtp.example.com', true);
CREATE TABLE ir_config_parameter (id serial PRIMARY KEY, key varchar NOT NULL UNIQUE,
    value text NOT NULL);
INSERT INTO ir_config_parameter (key, value) VALUES
    ('database.uuid', '5a1e0000-0000-4000-8000-00000000d3m0'),
    ('web.base.url', 'http://127.0.0.1:18069');
CREATE TABLE res_partner (id serial PRIMARY KEY, name varchar);
INSERT INTO res_partner (name) SELECT 'Customer ' || i FROM generate_series(1, 100) i;
