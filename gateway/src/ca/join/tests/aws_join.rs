//! `aws-iam` joins: placeholder until the local STS lands.
