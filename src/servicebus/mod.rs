//! Our thin Service Bus client on fe2o3-amqp.
