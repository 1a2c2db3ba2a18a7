"""The gRPC front door (`citadel.v1`), served beside HTTP by the gateway process."""
