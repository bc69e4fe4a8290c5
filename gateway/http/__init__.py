"""The HTTP surface: routes, parsing into an ImageJob, the per-request context, errors in
OpenAI's envelope, the OpenAPI document.

The top of the request's path below the app: may import every package but app and cli.
"""
