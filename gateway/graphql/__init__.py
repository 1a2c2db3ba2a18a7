"""The GraphQL front door at `/graphql` (strawberry), mounted in the HTTP app."""
