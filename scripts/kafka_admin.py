#!/usr/bin/env python3
"""Broker-side admin for the test stack's Kafka (tansu), over the Kafka protocol.

tansu's own CLI cannot speak SASL, so once the broker enforces authentication, users and
topics are managed with confluent-kafka's AdminClient (bundled librdkafka 2.x), logged in
as the stack's admin user.

    kafka_admin.py upsert-user NAME PASSWORD [--mechanism SCRAM-SHA-512|SCRAM-SHA-256|both]
    kafka_admin.py create-topic NAME [--partitions N]
    kafka_admin.py check NAME PASSWORD [--mechanism M]   exit 0 if the broker accepts them

The broker address and admin login come from KAFKA_BOOTSTRAP, VAULTPOOL_KAFKA_ADMIN_USER and
VAULTPOOL_KAFKA_ADMIN_PASSWORD (the stack's env file). Passwords are never printed.
"""
import argparse
import os
import sys

from confluent_kafka import KafkaException
from confluent_kafka.admin import (
    AdminClient,
    NewTopic,
    ScramCredentialInfo,
    ScramMechanism,
    UserScramCredentialUpsertion,
)

TIMEOUT = 15


def config(user, password, mechanism="SCRAM-SHA-512"):
    return {
        "bootstrap.servers": os.environ["KAFKA_BOOTSTRAP"],
        "security.protocol": "SASL_PLAINTEXT",
        "sasl.mechanism": mechanism,
        "sasl.username": user,
        "sasl.password": password,
        "log_level": 0,
    }


def admin():
    return AdminClient(
        config(os.environ["VAULTPOOL_KAFKA_ADMIN_USER"], os.environ["VAULTPOOL_KAFKA_ADMIN_PASSWORD"])
    )


def upsert_user(args):
    mechanisms = {
        "SCRAM-SHA-512": [ScramMechanism.SCRAM_SHA_512],
        "SCRAM-SHA-256": [ScramMechanism.SCRAM_SHA_256],
        "both": [ScramMechanism.SCRAM_SHA_512, ScramMechanism.SCRAM_SHA_256],
    }[args.mechanism]
    upserts = [
        UserScramCredentialUpsertion(
            args.name, ScramCredentialInfo(m, 4096), args.password.encode()
        )
        for m in mechanisms
    ]
    client = admin()  # must outlive its futures
    for future in client.alter_user_scram_credentials(upserts).values():
        future.result(timeout=TIMEOUT)


def create_topic(args):
    client = admin()  # must outlive its futures
    futures = client.create_topics(
        [NewTopic(args.name, num_partitions=args.partitions, replication_factor=1)],
        operation_timeout=TIMEOUT,
    )
    for future in futures.values():
        try:
            future.result(timeout=TIMEOUT)
        except KafkaException as e:
            if e.args[0].name() != "TOPIC_ALREADY_EXISTS":
                raise


def check(args):
    errors = []
    conf = config(args.name, args.password, args.mechanism)
    conf["error_cb"] = errors.append
    client = AdminClient(conf)
    try:
        client.list_topics(timeout=5)
        failed = None
    except KafkaException as e:
        failed = e
    client.poll(0.5)  # serve the error callbacks
    if failed is not None or errors:
        why = errors[0].str() if errors else str(failed)
        print(f"refused: {why}")
        sys.exit(1)
    print("accepted")


def main():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("upsert-user")
    p.add_argument("name")
    p.add_argument("password")
    p.add_argument("--mechanism", default="both")
    p.set_defaults(run=upsert_user)
    p = sub.add_parser("create-topic")
    p.add_argument("name")
    p.add_argument("--partitions", type=int, default=1)
    p.set_defaults(run=create_topic)
    p = sub.add_parser("check")
    p.add_argument("name")
    p.add_argument("password")
    p.add_argument("--mechanism", default="SCRAM-SHA-512")
    p.set_defaults(run=check)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
