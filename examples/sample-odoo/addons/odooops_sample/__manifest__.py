{
    "name": "odooops sample",
    "version": "17.0.1.0.0",
    "summary": "Placeholder module so that the sample project looks like an Odoo addon",
    "depends": ["base"],
    "data": [],
    "installable": True,
    "license": "LGPL-3",
}
