"""Composition root for Azure Functions (Python v2 model): one Blueprint per stage, one for sweep jobs, one for
the HTTP API."""

import azure.functions as func

from functions.http import http_api
from functions.jobs import jobs
from functions.stages import check_solution, validate_credentials, write_lead

app = func.FunctionApp()
for blueprint in (validate_credentials, check_solution, write_lead, jobs, http_api):
    app.register_functions(blueprint)
