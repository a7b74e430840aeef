"""Azure ML: register a saved model, deploy it to online and batch endpoints, run pipelines.

One module per concern (azure-ai-ml SDK v2; nothing here needs a source checkout at run time):

- ``deployment_settings``  OnlineSettings / BatchSettings: what a deployment can be told (light:
                           the CLI builds its options from them without importing the SDK)
- ``client``               the MLClient, from arguments, a job's AZUREML_ARM_* variables or config.json
- ``environment``          the serving environment: its Docker build context (package data), as an
                           SDK entity and as YAML; regenerating the context's pin files is a developer tool
- ``entities``             settings -> endpoint / deployment / environment entities, and the scoring
                           code a deployment uploads (``scoring_code``)
- ``yaml_files``           entities -> the YAML files ``az ml`` takes (what ``--dry-run`` writes)
- ``deploy``               create or update environment, endpoint, deployment; traffic
- ``register``             a saved model -> a registered model version, and the registration file
                           the deploy steps read
- ``pipeline``             pipeline job YAML loaded, validated, submitted
- ``specs``, ``generate``  developer tools: the deploy components' spec.yaml and example YAML, and
                           every generated file of the checkout (``python -m mmdet_mlflow.azure.generate``)

The CLI commands ``register``, ``deploy`` and ``pipeline`` (``mmdet_mlflow/commands``) are the
only entries; the Azure components run them.
"""
